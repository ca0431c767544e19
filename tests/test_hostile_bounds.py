"""Hostile peers against the bounds of a listener (issue 15): one message never crashes,
stalls or grows it, and after each attack the listener still serves a well-behaved peer."""

from __future__ import annotations

import gc
import json
import os
import struct
import time
import weakref
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
import zmq

from bench.attack import echo_listener, open_fds, rss_mib
from transport import _wire
from transport._wire import Hello


def _dealer(address: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 10000)
    s.connect(f"tcp://{address}")
    return s


def _hello_frames(body: bytes) -> list[bytes]:
    return [struct.pack("<4sI", _wire.MAGIC, _wire.PROTOCOL_VERSION), body]


def _still_serves(address: str, proc: Any = None, secret: str | None = None) -> None:
    """A well-behaved peer connects, sends a tensor and gets it back."""
    from transport import Pipe
    from transport.auth import Auth

    if proc is not None:
        assert proc.is_alive(), f"listener process died (exit code {proc.exitcode})"
    with Pipe.connect(address, timeout_s=30, auth=Auth.secret(secret) if secret else Auth.none()) as c:
        x = torch.arange(100_000, dtype=torch.float32)
        c.send_tensor(x)
        assert torch.equal(c.recv_tensor(timeout=30), x)
        c.send_tensor(None)
        assert c.recv_tensor(timeout=30) is None


@pytest.fixture
def remote_listener(peers):
    """An echoing listener in its own process: an abort there must not take the test with it."""
    p = peers.start(echo_listener)
    address = peers.expect(p, "addr", 120)
    yield address, p
    p.kill()


# -- 3. an unterminated multipart message -----------------------------------------------
_SECRET = "hostile-bounds-secret-0123456789"


@pytest.fixture
def secret_listener(peers):
    p = peers.start(echo_listener, _SECRET)
    address = peers.expect(p, "addr", 120)
    yield address, p
    p.kill()


def test_unterminated_multipart_message_does_not_grow_an_authenticated_listener(secret_listener):
    """A raw TCP peer without the secret speaks ZMTP and sends endless "more follows" parts:
    the ZeroMQ handshake (CURVE keys derived from the secret) refuses it before any part is
    buffered, so the listener's memory stays put and it still serves."""
    from bench.attack import zmtp_unterminated_parts

    address, proc = secret_listener
    host, port = address.rsplit(":", 1)
    time.sleep(0.5)
    rss0 = rss_mib(proc.pid)
    sent = sum(zmtp_unterminated_parts(host, int(port), 384 << 20) for _ in range(3))
    time.sleep(0.5)
    grown = rss_mib(proc.pid) - rss0
    # the old code buffered every part: ~1 GiB here
    assert grown < 64, f"listener RSS grew {grown:.0f} MiB after {sent >> 20} MiB of unterminated parts"
    _still_serves(address, proc, _SECRET)


# -- 1. fields that reach native code ---------------------------------------------------
@pytest.mark.parametrize("worker_address", [b"", b"\x02", b"\xff", b"x", b"\x0f" + b"\x00" * 100])
def test_bad_worker_address_is_rejected_not_aborting(remote_listener, worker_address):
    address, proc = remote_listener
    s = _dealer(address)
    s.send_multipart(_wire.encode(Hello(role="pipe", name="evil", worker_address=worker_address, recv_tag=5)))
    ans = _wire.decode(s.recv_multipart(), "listener")  # the old code aborted here (SIGABRT in UCX)
    assert isinstance(ans, _wire.Reject) and "worker address" in ans.reason, ans
    s.close(0)
    _still_serves(address, proc)


# -- 2. any decoder exception is a Reject; the control thread cannot die -------------------
def test_deeply_nested_hello_is_rejected_and_control_thread_lives(remote_listener):
    address, proc = remote_listener
    ok = msgspec.msgpack.encode({"type": "Hello", "role": "pipe", "name": "n", "worker_address": b"",
                                 "recv_tag": 5, "zz": 0})
    body = ok[:-1] + b"\x91" * 60000 + b"\xc0"  # the unknown field "zz" nested 60,000 deep
    s = _dealer(address)
    for _ in range(3):
        s.send_multipart(_hello_frames(body))
        ans = _wire.decode(s.recv_multipart(), "listener")
        assert isinstance(ans, _wire.Reject) and ans.code == "malformed", ans
    s.close(0)
    _still_serves(address, proc)


# -- also noted: a Reject never echoes a huge attacker field ------------------------------
def test_reject_does_not_echo_huge_fields(remote_listener):
    address, proc = remote_listener
    s = _dealer(address)
    huge = "S" * 60000
    s.send_multipart(_wire.encode(Hello(role="pipe", name="n", worker_address=b"\x00" * 20, recv_tag=5,
                                        service=huge)))
    ans = _wire.decode(s.recv_multipart(), "listener")
    assert isinstance(ans, _wire.Reject) and len(ans.reason) < 400, len(ans.reason)
    s.send_multipart(_hello_frames(msgspec.msgpack.encode({"type": "Hello", "role": huge})))
    ans = _wire.decode(s.recv_multipart(), "listener")
    assert isinstance(ans, _wire.Reject) and len(ans.reason) < 400, len(ans.reason)
    s.close(0)
    _still_serves(address, proc)


# -- 5. received lengths are checked against the header ------------------------------------
def _listener_still_serves(lst: Any) -> None:
    """An in-process listener still admits a new pipe and delivers a tensor on it; then it is closed."""
    from transport import Pipe

    with Pipe.connect(lst.address, timeout_s=30) as c2:
        s2 = lst.accept(timeout=30)
        c2.send_tensor_async(torch.arange(10)).wait(30)
        assert torch.equal(s2.recv_tensor(timeout=30), torch.arange(10))
        s2.close()
    lst.close()


def _raw_pair() -> tuple[Any, Any, Any]:
    from transport import Pipe, PipeListener

    lst = PipeListener("127.0.0.1", 0, timeout_s=30)
    client = Pipe.connect(lst.address, timeout_s=30)
    server = lst.accept(timeout=30)
    return lst, client, server


def _send_raw(client: Any, seq: int, header: Any, inline: bytes | None, payload: np.ndarray | None) -> list[Any]:
    from transport import _envelope as codec

    frame = np.zeros(codec.HEADER_FRAME_SIZE, dtype=np.uint8)
    used = codec.encode_header(memoryview(frame), header, [inline] if inline else [])
    eng = client._engine
    reqs = [eng.tag_send(client._ep, frame[:used], client._tag(client._send_tag, seq, False)), frame]
    if payload is not None:
        reqs += [eng.tag_send(client._ep, payload, client._tag(client._send_tag, seq, True)), payload]
    return reqs


@pytest.mark.parametrize("case", ["short_payload", "long_payload", "missing_inline"])
def test_payload_or_inline_shorter_than_header_is_a_protocol_error(case):
    from transport import RemoteProtocolError
    from transport import _envelope as codec

    lst, client, server = _raw_pair()
    try:
        if case == "missing_inline":  # header says 1000 inline bytes, none follow
            h = codec.Header(0, [codec.TensorSpec("uint8", [1000], 1000, "cpu", True)])
            keep = _send_raw(client, 0, h, None, None)
        else:
            n = 1 << 20
            sent = n - 10 if case == "short_payload" else n + 10
            h = codec.Header(0, [codec.TensorSpec("uint8", [n], n, "cpu", False)])
            keep = _send_raw(client, 0, h, None, np.ones(sent, dtype=np.uint8))
        with pytest.raises(RemoteProtocolError, match="arrived|overruns|frame holds"):
            server.recv_tensor(timeout=20)  # the old code returned a tensor with a stale tail
        del keep
        client.close()
        server.close()
        # the listener still serves a well-behaved peer
        from transport import Pipe

        with Pipe.connect(lst.address, timeout_s=30) as c2:
            s2 = lst.accept(timeout=30)
            h2 = c2.send_tensor_async(torch.arange(1 << 18))
            assert torch.equal(s2.recv_tensor(timeout=30), torch.arange(1 << 18))
            h2.wait(30)
            s2.close()
    finally:
        client.close()
        server.close()
        lst.close()


def test_unallocatable_shape_claim_is_a_protocol_error():
    from transport import RemoteProtocolError
    from transport import _envelope as codec

    lst, client, server = _raw_pair()
    try:
        h = codec.Header(0, [codec.TensorSpec("uint8", [0, 1 << 62], 0, "cpu", False)])
        keep = _send_raw(client, 0, h, None, None)
        with pytest.raises(RemoteProtocolError):
            server.recv_tensor(timeout=20)
        del keep
    finally:
        client.close()
        server.close()
        lst.close()


# -- 7. no reference cycle keeps a received tensor alive -----------------------------------
def test_received_tensor_is_freed_with_its_last_reference():
    lst, client, server = _raw_pair()
    gc.disable()
    try:
        for n in (100, 1 << 22):  # inline and rendezvous-size
            h = client.send_tensor_async(torch.ones(n))
            t = server.recv_tensor(timeout=30)
            h.wait(30)
            ref = weakref.ref(t)
            del t
            assert ref() is None, f"a received {n}-element tensor outlived its last reference (reference cycle)"
        hs = client.send_tensors_async([torch.ones(1 << 20), torch.ones(10)])
        got = server.recv_tensors_async(2).wait(30)
        hs.wait(30)
        refs = [weakref.ref(t) for t in got]
        del got
        assert all(r() is None for r in refs)
    finally:
        gc.enable()
        client.close()
        server.close()
        lst.close()


# -- 8. what a peer parks in the shared worker goes when its pipe goes ---------------------
def _parked(eng: Any, tag: int, bits: int) -> bool:
    """Whether a message on ``tag``'s range (its top 64 - ``bits`` bits) waits in the worker or the engine's stash."""
    api = eng._api
    with eng._lock:
        if eng.worker.tag_probe(api.UCXXTag(tag), api.UCXXTagMask(((1 << 64) - 1) ^ ((1 << bits) - 1)),
                                remove=False).matched:
            return True
        return any(t >> bits == tag >> bits for t in getattr(eng, "_stash", {}))


def test_unreceived_messages_are_dropped_when_the_pipe_closes():
    from transport import _envelope as codec

    lst, client, server = _raw_pair()
    try:
        keep = []
        for seq in range(1000, 1200):  # eager messages on tags nobody will receive
            h = codec.Header(seq, [None])
            keep += _send_raw(client, seq, h, None, None)
        eng = server._engine
        base = server._tag(server._recv_tag, 0, False)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not _parked(eng, base | (1199 << 1), 0):
            with eng._lock:
                eng.worker.progress()
        assert _parked(eng, base, 24), "test sent nothing"
        server.close()
        with eng._lock:
            eng.worker.progress()
        assert not _parked(eng, base, 24), "messages of a closed pipe stayed in the worker's unexpected queue"
        del keep
    finally:
        client.close()
        server.close()
    _listener_still_serves(lst)


def test_messages_sent_after_the_pipe_closed_are_dropped_as_they_arrive():
    """A peer that keeps sending on a closed pipe's tags, or on tags no pipe ever had, parks nothing."""
    from transport import _envelope as codec

    lst, client, server = _raw_pair()
    eng = server._engine
    base = server._tag(server._recv_tag, 0, False)
    stranger = (12345 << 24) | 2  # a tag base no pipe has (pipe bases are odd)
    try:
        server.close()  # our side is gone; the peer's endpoint still reaches the worker
        keep = []
        for seq in range(300):
            keep += _send_raw(client, seq, codec.Header(seq, [None]), None, None)
            junk = np.full(4096, seq & 0xFF, dtype=np.uint8)
            keep += [eng.tag_send(client._ep, junk, stranger | (seq << 1)), junk]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with eng._lock:
                eng._progress()
            if not _parked(eng, base, 24) and not _parked(eng, stranger, 24):
                break
            time.sleep(0.05)
        assert not _parked(eng, base, 24), "messages sent after the pipe closed stay in the worker"
        assert not _parked(eng, stranger, 24), "messages on tags nobody owns stay in the worker"
        del keep
    finally:
        client.close()
    _listener_still_serves(lst)


# -- 4. a lookup request carries only the tensors its type needs ----------------------------
def test_lookup_request_cannot_announce_tensors_it_does_not_carry():
    from kv_transfer import _lookup_wire as wire
    from kv_transfer.lookup_buffer import LookupBuffer
    from transport import Pipe, PeerError

    buf = LookupBuffer(capacity_bytes=1 << 20)
    server = buf.serve("127.0.0.1", 0)
    try:
        with Pipe.connect(server.address, timeout_s=30, service="kvlookup") as c:
            # a Stats arriving with 2 tensors: answered with an error; the envelope's header said how many
            # followed, so they were received with it and the pipe stays in step
            c.send_message(wire.encode(wire.Stats(seq=1)), [torch.ones(4), torch.ones(4)])
            ans = wire.decode_response(c.recv_message(timeout=30)[0], "server")
            assert isinstance(ans, wire.ErrorReply) and "carries 0" in ans.message, ans
            c.send_message(wire.encode(wire.Stats(seq=2)))
            ans = wire.decode_response(c.recv_message(timeout=30)[0], "server")
            assert isinstance(ans, wire.StatsReply) and ans.seq == 2
        with Pipe.connect(server.address, timeout_s=30, service="kvlookup") as c:
            # hundreds announced (as many as one header holds): the server answers and drops this
            # consumer without receiving any of them
            c.send_message(wire.encode(wire.Stats(seq=3)), [torch.ones(1 << 16)] * 300)
            ans = wire.decode_response(c.recv_message(timeout=30)[0], "server")
            assert isinstance(ans, wire.ErrorReply) and "at most 2" in ans.message, ans
            with pytest.raises(PeerError):
                c.recv_message(timeout=30)
        with Pipe.connect(server.address, timeout_s=30, service="kvlookup") as c:
            # a query tensor above the request bound is refused by the server's pipe, not allocated
            c.send_message_async(wire.encode(wire.Fetch(seq=4)),
                                 [torch.zeros((wire.MAX_REQUEST_TENSOR_BYTES // 8) + 1, dtype=torch.int64), None])
            with pytest.raises(PeerError):
                c.recv_message(timeout=30)
        # still serves
        client = LookupBuffer.connect(server.address, timeout_s=30)
        assert client.stats()["num_entries"] == 0
        client.close()
    finally:
        server.close()


def test_lookup_answer_with_the_wrong_parts_is_a_protocol_error():
    """A producer whose Found lists other than three parts, or parts that describe other tensors than
    arrived, gets a LookupProtocolError from fetch (never a ValueError from unpacking)."""
    import threading

    from kv_transfer import LookupClient, LookupProtocolError
    from kv_transfer import _lookup_wire as wire
    from transport import PipeListener

    answers = [([-2, -2], 4), ([-2, -2, -2], 4), ([-2, 3, -1], 3)]  # (parts, tensors sent)
    lst = PipeListener(service="kvlookup", timeout_s=30)

    def fake_producer() -> None:
        with lst.accept(30) as p:
            for parts, n in answers:
                body, _ = p.recv_message(timeout=30)
                seq = wire.decode_request(body, 2, "client").seq
                p.send_message(wire.encode(wire.Found(seq, 1, parts)), [torch.ones(1)] * n)

    th = threading.Thread(target=fake_producer, daemon=True)
    th.start()
    try:
        with LookupClient(lst.address, timeout_s=30) as c:
            for parts, _ in answers:
                with pytest.raises(LookupProtocolError, match="malformed answer|describe"):
                    c.fetch(torch.tensor([1]))
        th.join(30)
    finally:
        lst.close()


def test_lookup_answer_echoing_tokens_it_cannot_echo_is_a_protocol_error():
    """A Found that says the query's tokens are echoed (wire v3) while it sends tokens anyway, or to a
    query that sent none, or with a roi, is refused with LookupProtocolError; the client keeps working."""
    import threading

    from kv_transfer import LookupClient, LookupProtocolError
    from kv_transfer import _lookup_wire as wire
    from transport import PipeListener

    lst = PipeListener(service="kvlookup", timeout_s=30)
    answers = [[torch.ones(1), None, torch.ones(1)], [None, None, torch.ones(1)], [None, None, torch.ones(1)],
               [None, None, torch.ones(1)]]  # the last one is a good echo

    def fake_producer() -> None:
        with lst.accept(30) as p:
            for tensors in answers:
                body, _ = p.recv_message(timeout=30)
                seq = wire.decode_request(body, 2, "client").seq
                p.send_message(wire.encode(wire.Found(seq, 1, [-2, -1, -1], None, True)), tensors)

    th = threading.Thread(target=fake_producer, daemon=True)
    th.start()
    try:
        with LookupClient(lst.address, timeout_s=30) as c:
            with pytest.raises(LookupProtocolError, match="echo of the query's tokens with tokens"):
                c.fetch(torch.tensor([1]))
            with pytest.raises(LookupProtocolError, match="echo of the query's tokens with no query tokens"):
                c.fetch(None, request_id="r")
            with pytest.raises(LookupProtocolError, match="or a roi"):
                c.fetch(torch.tensor([1]), torch.tensor([True]))
            q = torch.tensor([1])
            assert c.fetch(q).input_tokens is q
        th.join(30)
    finally:
        lst.close()


# -- 6. closed pipes give their sockets back ----------------------------------------------
def test_fds_return_to_baseline_after_many_short_lived_consumers(remote_listener):
    from transport import Pipe

    address, proc = remote_listener
    x = torch.ones(1 << 18)  # 1 MiB: rendezvous size, the case that leaked a TCP socket per pipe

    def consumer() -> None:
        with Pipe.connect(address, timeout_s=30) as c:
            c.send_tensor(x)
            assert c.recv_tensor(timeout=30).numel() == x.numel()
            c.send_tensor(None)
            assert c.recv_tensor(timeout=30) is None

    for _ in range(3):
        consumer()
    time.sleep(0.5)
    base_l, base_c, rss0 = open_fds(proc.pid), open_fds(os.getpid()), rss_mib(proc.pid)
    for _ in range(200):
        consumer()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (open_fds(proc.pid) > base_l + 3 or open_fds(os.getpid()) > base_c + 3):
        time.sleep(0.2)
    assert open_fds(proc.pid) <= base_l + 3, f"listener fds {base_l} -> {open_fds(proc.pid)} after 200 consumers"
    assert open_fds(os.getpid()) <= base_c + 3, f"consumer fds {base_c} -> {open_fds(os.getpid())} after 200 pipes"
    assert rss_mib(proc.pid) < rss0 + 200, f"listener RSS {rss0:.0f} -> {rss_mib(proc.pid):.0f} MiB"
    _still_serves(address, proc)


# -- 9. the proxy: JSON 413, big bodies off the event loop, quiet disconnects --------------
@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    from tests.test_proxy import FakeCluster, ProxyProc

    cluster = FakeCluster()
    p1, d1 = cluster.start("p1", "prefill"), cluster.start("d1", "decode")
    proc = ProxyProc(["--prefill", p1.url, "--decode", d1.url, "--timeout", "60"],
                     tmp_path_factory.mktemp("proxy") / "proxy.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.close()
        cluster.close()


def _proxy_serves(proxy: Any) -> None:
    from tests.test_proxy import call

    status, body = call("POST", proxy.url + "/v1/completions", {"prompt": "hi", "max_tokens": 3})
    assert status == 200 and body["served_by"] == "d1", (status, body)


def test_proxy_oversized_body_gets_a_json_413(proxy):
    from bench.attack import post_raw_body

    head, body = post_raw_body(proxy.url, 64 * 1024 * 1024 + 1)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert b"application/json" in head
    assert json.loads(body)["error"]["code"] == 413
    _proxy_serves(proxy)


def test_proxy_client_closing_mid_body_logs_no_traceback(proxy):
    import socket

    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    for _ in range(5):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100000\r\n\r\n{\"prompt\": [1, 2")
            time.sleep(0.05)
    time.sleep(0.5)
    _proxy_serves(proxy)
    logs = proxy.logs()
    assert "Traceback" not in logs and "Error handling request" not in logs, logs[-3000:]


_POLLER = """
import sys, time, urllib.request
url, worst = sys.argv[1], 0.0
while True:
    t0 = time.monotonic()
    urllib.request.urlopen(url, timeout=60).read()
    worst = max(worst, time.monotonic() - t0)
    print(f"{worst:.3f}", flush=True)
    time.sleep(0.05)
"""


def test_proxy_big_body_does_not_stall_other_clients(proxy, tmp_path):
    import subprocess
    import sys

    from tests.test_proxy import call

    # the poller is its own process: the fake upstreams here parse 20 MiB too and hold our GIL
    poller = subprocess.Popen([sys.executable, "-c", _POLLER, proxy.url + "/metrics"], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert poller.stdout.readline()  # polling works before the big body arrives
        body = {"prompt": list(range(2_500_000)), "max_tokens": 3}  # ~20 MiB of JSON
        status, answer = call("POST", proxy.url + "/v1/completions", body, timeout=120)
        assert status == 200, (status, answer)
        time.sleep(0.3)
    finally:
        poller.kill()
    worst = float(poller.stdout.read().split()[-1])
    assert worst < 1.0, f"/metrics took {worst:.2f}s while a 20 MiB body was being handled"
    _proxy_serves(proxy)


# -- issue 10: a configuration that works prints no UCX ERROR line ------------------------
_SM_PIPE = """
import torch
from transport import Pipe, PipeListener
lst = PipeListener("127.0.0.1", 0)
c = Pipe.connect(lst.address, timeout_s=30)
s = lst.accept(timeout=30)
h = c.send_tensor_async(torch.ones(1 << 20))
assert s.recv_tensor(timeout=30).numel() == 1 << 20
h.wait(30)
c.close(); s.close(); lst.close()
print("moved")
"""


def test_shared_memory_only_pipe_logs_no_ucx_error():
    import subprocess
    import sys

    env = dict(os.environ, UCX_TLS="sm")
    r = subprocess.run([sys.executable, "-c", _SM_PIPE], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "moved" in r.stdout, r.stderr[-2000:]
    assert "UCX  ERROR" not in r.stderr, r.stderr[-2000:]
