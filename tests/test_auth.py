"""Control-plane authentication: shared secret (HMAC challenge) and ZeroMQ CURVE.

An unauthenticated or wrongly keyed peer gets no Welcome (so no worker address
and no KV); the listener keeps serving good peers afterwards.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import zmq

from tests.peers import _report
from transport import LocalUsageError, PeerRejectedError, PeerTimeoutError, Pipe, _wire
from transport.auth import Auth

SECRET = "correct horse battery staple 0123456789"
WRONG = "not the secret, but long enough 9876543210"


def _curve() -> dict[str, Auth]:
    sp, ss = zmq.curve_keypair()
    cp, cs = zmq.curve_keypair()
    xp, xs = zmq.curve_keypair()
    return {
        "server": Auth.curve(sp, ss, clients=[cp]),
        "client": Auth.curve(cp, cs, server_key=sp),
        "stranger": Auth.curve(xp, xs, server_key=sp),  # a key the server does not admit
        "wrong_server_key": Auth.curve(cp, cs, server_key=xp),
    }


def _roundtrip(listener: Pipe, client: Pipe) -> None:
    t = torch.randint(0, 256, (100_000,), dtype=torch.uint8)  # past the inline limit: a UCX payload
    h = client.send_tensor_async(t)
    got = listener.recv_tensor(timeout=20)
    h.wait(20)
    assert torch.equal(got, t)


# -- shared secret ----------------------------------------------------------------------
def test_secret_pipe_works_and_wrong_or_missing_secret_is_rejected():
    good = Auth.secret(SECRET)
    with Pipe.listen(auth=good, timeout_s=30) as lst:
        for bad, match in ((Auth.secret(WRONG), "authentication failed.*prove it knows"),
                           (Auth.none(), "requires authentication")):
            t0 = time.monotonic()
            with pytest.raises(PeerRejectedError, match=match):
                Pipe.connect(lst.address, auth=bad, timeout_s=10)
            assert time.monotonic() - t0 < 5  # a clear answer, not a timeout
        assert not lst._connected.is_set()  # nobody got a Welcome
        assert lst._server.auth_failures >= 1
        with Pipe.connect(lst.address, auth=good, timeout_s=10) as c:  # still serves the good peer
            _roundtrip(lst, c)


def test_secret_client_refuses_a_listener_without_auth():
    with Pipe.listen(auth=Auth.none(), timeout_s=30) as lst:
        t0 = time.monotonic()
        with pytest.raises(PeerRejectedError, match="authentication failed.*another authentication mode or none"):
            Pipe.connect(lst.address, auth=Auth.secret(SECRET), timeout_s=10)
        assert time.monotonic() - t0 < 5  # the failed ZeroMQ handshake is the answer


def test_secret_proofs_cannot_be_replayed_or_forged():
    """A raw client replays a good proof from another connection, or forges one: Reject, no Welcome.

    The client runs the CURVE keys the secret implies (without them it fails the ZeroMQ
    handshake and sends nothing at all): this checks the proofs beneath that layer."""
    auth = Auth.secret(SECRET)
    public, secret = auth.derived_curve("client")
    with Pipe.listen(auth=auth, timeout_s=30) as lst:
        ctx = zmq.Context()
        try:
            socks = []
            for _ in range(2):
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.RCVTIMEO, 5000)
                s.curve_publickey, s.curve_secretkey = public, secret
                s.curve_serverkey = auth.derived_curve("server")[0]
                s.connect(f"tcp://{lst.address}")
                socks.append(s)
            a, b = socks
            hello = _wire.Hello(role="pipe", name="eve", worker_address=b"x" * 10, recv_tag=5,
                                auth_nonce=os.urandom(32))
            a.send_multipart(_wire.encode(hello))
            ch = _wire.decode(a.recv_multipart(), "test")
            assert isinstance(ch, _wire.Challenge)
            # without the secret: a made-up proof
            import msgspec

            forged = msgspec.structs.replace(hello, auth_proof=os.urandom(32))
            a.send_multipart(_wire.encode(forged))
            ans = _wire.decode(a.recv_multipart(), "test")
            assert isinstance(ans, _wire.Reject) and ans.code == "auth", ans
            # a proof made for connection a's challenge, replayed on connection b (no challenge there)
            from transport._control import _hello_proof

            proven = msgspec.structs.replace(hello, auth_proof=_hello_proof(auth, hello, ch.nonce))
            b.send_multipart(_wire.encode(proven))
            ans = _wire.decode(b.recv_multipart(), "test")
            assert isinstance(ans, _wire.Reject) and ans.code == "auth" and "no challenge" in ans.reason, ans
            # and on a itself the challenge was single use (consumed by the forged attempt)
            a.send_multipart(_wire.encode(proven))
            ans = _wire.decode(a.recv_multipart(), "test")
            assert isinstance(ans, _wire.Reject) and ans.code == "auth", ans
        finally:
            ctx.destroy(linger=0)
        assert not lst._connected.is_set()


# -- CURVE ----------------------------------------------------------------------------------
@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_curve_pipe_works_and_unknown_keys_are_refused():
    keys = _curve()
    with Pipe.listen(auth=keys["server"], timeout_s=30) as lst:
        for who in ("stranger", "wrong_server_key"):
            t0 = time.monotonic()
            with pytest.raises(PeerRejectedError, match="authentication failed"):
                Pipe.connect(lst.address, auth=keys[who], timeout_s=5)
            assert time.monotonic() - t0 < 4
        # no auth at all: the ZeroMQ handshake fails (mechanisms differ), said at once
        t0 = time.monotonic()
        with pytest.raises(PeerRejectedError, match="requires authentication"):
            Pipe.connect(lst.address, auth=Auth.none(), timeout_s=5)
        assert time.monotonic() - t0 < 4
        assert not lst._connected.is_set()
        assert lst._server.auth_failures >= 1
        with Pipe.connect(lst.address, auth=keys["client"], timeout_s=10) as c:
            _roundtrip(lst, c)


def test_bad_configuration_is_a_local_usage_error(tmp_path):
    with pytest.raises(LocalUsageError, match="at least 16"):
        Auth.secret("short")
    with pytest.raises(LocalUsageError, match="UCXKV_AUTH"):
        Auth.from_env({"UCXKV_AUTH": "kerberos"})
    with pytest.raises(LocalUsageError, match="UCXKV_SECRET"):
        Auth.from_env({"UCXKV_AUTH": "secret"})
    assert Auth.from_env({}).mode == "none"
    f = tmp_path / "secret"
    f.write_text(SECRET + "\n")
    assert Auth.from_env({"UCXKV_AUTH": "secret", "UCXKV_SECRET_FILE": str(f)}) == Auth.secret(SECRET)
    assert "correct" not in repr(Auth.secret(SECRET))  # secrets stay out of logs
    if zmq.has("curve"):
        from zmq.auth import create_certificates

        create_certificates(tmp_path, "server")
        (tmp_path / "clients").mkdir()
        create_certificates(tmp_path / "clients", "decode0")
        env = {"UCXKV_AUTH": "curve", "UCXKV_CURVE_CERT": str(tmp_path / "server.key_secret"),
               "UCXKV_CURVE_CLIENTS": str(tmp_path / "clients")}
        a = Auth.from_env(env)
        assert a.mode == "curve" and len(a.curve_clients) == 1
        with pytest.raises(LocalUsageError, match="public keys of the clients"):
            Pipe.listen(auth=Auth.curve(a.curve_public, a.curve_secret))
        with pytest.raises(LocalUsageError, match="listener's public key"):
            Pipe.connect("127.0.0.1:1", auth=Auth.curve(a.curve_public, a.curve_secret), timeout_s=1)


# -- the lookup server: no auth, no KV ----------------------------------------------------
def _auth_consumer(q, address: str, env: dict) -> None:
    """A consumer process configured by environment only (as vLLM's connector would be)."""
    os.environ.update(env)
    from kv_transfer import LookupClient

    def body():
        with LookupClient(address, timeout_s=20) as c:
            m = c.fetch(torch.arange(16), None, request_id="secret-prompt", wait_s=5)
            return None if m is None else m.key.tolist()

    _report(q, body)


@pytest.mark.parametrize("mode", ["secret", "curve"])
def test_unauthenticated_consumer_cannot_fetch_and_server_keeps_serving(mode, peers, tmp_path):
    from kv_transfer import LookupBuffer, LookupClient, PeerUnavailableError

    if mode == "curve":
        if not zmq.has("curve"):
            pytest.skip("libzmq without CURVE")
        from zmq.auth import create_certificates, load_certificate

        create_certificates(tmp_path, "server")
        (tmp_path / "clients").mkdir()
        create_certificates(tmp_path / "clients", "decode")
        sp, ss = load_certificate(tmp_path / "server.key_secret")
        cp, _ = load_certificate(tmp_path / "clients" / "decode.key")
        server_auth = Auth.curve(sp, ss, clients=[cp])
        good_env = {"UCXKV_AUTH": "curve", "UCXKV_CURVE_CERT": str(tmp_path / "clients" / "decode.key_secret"),
                    "UCXKV_CURVE_SERVER_CERT": str(tmp_path / "server.key")}
        xp, xs = zmq.curve_keypair()
        bad_auths = [Auth.none(), Auth.curve(xp, xs, server_key=sp)]
    else:
        server_auth = Auth.secret(SECRET)
        good_env = {"UCXKV_AUTH": "secret", "UCXKV_SECRET": SECRET}
        bad_auths = [Auth.none(), Auth.secret(WRONG)]

    buf = LookupBuffer(1 << 20, lease_s=60)
    key = torch.arange(1000, dtype=torch.float32)
    buf.insert(torch.arange(16), None, key, None, None, request_id="secret-prompt")
    with buf.serve("127.0.0.1", 0, auth=server_auth) as server:
        for bad in bad_auths:
            with pytest.raises(PeerUnavailableError, match="auth"):
                LookupClient(server.address, timeout_s=1.5, auth=bad)
        assert server.num_consumers == 0 and buf.num_entries == 1  # nothing was handed out
        good = peers.start(_auth_consumer, server.address, good_env)
        assert peers.expect(good, "ok", 120) == key.tolist()
        assert buf.bytes_used == 0


def test_non_loopback_listener_needs_auth_or_an_explicit_opt_out(monkeypatch):
    """Authentication is required by default on any address but loopback; UCXKV_AUTH=none or
    auth=Auth.none() turns it off explicitly, and a loopback listener needs neither."""
    monkeypatch.delenv("UCXKV_AUTH", raising=False)
    assert not Auth.from_env({}).explicit and Auth.from_env({"UCXKV_AUTH": "none"}).explicit
    with pytest.raises(LocalUsageError, match="refusing to listen on 0.0.0.0.*UCXKV_AUTH=none"):
        Pipe.listen("0.0.0.0", 0, timeout_s=5)
    with Pipe.listen("127.0.0.1", 0, timeout_s=5):  # loopback: off by default, as before
        pass
    for opt_out in (Auth.none(), Auth.from_env({"UCXKV_AUTH": "none"})):
        with Pipe.listen("0.0.0.0", 0, timeout_s=5, auth=opt_out) as lst:
            with Pipe.connect(f"127.0.0.1:{lst.address.rsplit(':', 1)[1]}", timeout_s=10, auth=Auth.none()) as c:
                _roundtrip(lst, c)
    with Pipe.listen("0.0.0.0", 0, timeout_s=5, auth=Auth.secret(SECRET)) as lst:
        with Pipe.connect(f"127.0.0.1:{lst.address.rsplit(':', 1)[1]}", timeout_s=10,
                          auth=Auth.secret(SECRET)) as c:
            _roundtrip(lst, c)
