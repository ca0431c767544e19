"""Pipe data tests: real UCX between spawned processes over loopback."""

from __future__ import annotations

import pytest

from tests import peers as P


def _stream(peers, tls: str, stream: str) -> dict:
    """Sends ``stream`` (a key of ``P.STREAMS``) from one spawned process to another; what the sender
    reported, once the receiver found every tensor bit-exact and as many bytes as were sent."""
    recv = peers.start(P.stream_receiver, tls, stream)
    addr = peers.expect(recv, "addr", 60)
    send = peers.start(P.stream_sender, tls, addr, stream)
    sent = peers.expect(send, "ok", 300)
    got = peers.expect(recv, "ok", 300)
    assert got["bad"] == [], got["bad"][:10]
    assert got["bytes"] == sent["bytes"]
    return sent


@pytest.mark.parametrize("tls", ["tcp", "sm", "default"])
def test_thousand_mixed_tensors_arrive_bit_exact_in_order(peers, tls):
    sent = _stream(peers, tls, "mixed")
    assert sent["bytes"] > P.BIG_BYTES


@pytest.mark.parametrize("tls", ["tcp", "sm"])
def test_a_message_of_many_tensors_is_one_header_and_its_payloads(peers, tls):
    sent = _stream(peers, tls, "messages")
    for k, (posted, big) in enumerate(zip(sent["posted"], sent["big"])):
        # one header (small tensors inline) and one payload per large tensor, plus the bare tensor's header
        assert big <= posted - 2 <= P.PER_MESSAGE // 2, (k, posted, big)
    assert sum(sent["posted"]) < P.N_MESSAGES * P.PER_MESSAGE  # never a header per tensor


def test_a_message_where_a_tensor_is_expected_is_a_protocol_error():
    import torch

    from transport import LocalUsageError, Pipe, PipeListener, RemoteProtocolError

    with PipeListener("127.0.0.1", 0, timeout_s=30) as lst, Pipe.connect(lst.address, timeout_s=30) as c:
        s = lst.accept(timeout=30)
        with s:
            with pytest.raises(LocalUsageError, match="cannot send an object"):
                c.send_message(b"m", [object()])
            c.send_message(b"m", [torch.ones(3), None])
            body, got = s.recv_message(timeout=30)
            assert body == b"m" and got[0].tolist() == [1.0, 1.0, 1.0] and got[1] is None
            c.send_tensor(torch.ones(2))
            with pytest.raises(RemoteProtocolError, match="bare tensor where message"):
                s.recv_message(timeout=30)


def test_connect_to_nothing_fails_fast_and_names_the_address():
    import time

    from transport import Pipe, PeerTimeoutError

    t0 = time.monotonic()
    with pytest.raises(PeerTimeoutError, match="127.0.0.1:1"):
        Pipe.connect("127.0.0.1:1", timeout_s=1.0)
    assert time.monotonic() - t0 < 5


def test_receive_in_place_and_mismatch_is_a_protocol_error(peers):
    import torch

    from transport import Pipe, RemoteProtocolError

    with Pipe.listen("127.0.0.1", 0, timeout_s=60) as p:
        send = peers.start(P.one_tensor_sender, p.address)
        out = torch.zeros(1000, dtype=torch.int32)
        got = p.recv_tensor(out=out)
        assert got is out and out.tolist() == list(range(1000))
        p.send_tensor(None)
        peers.expect(send, "ok", 60)
    with Pipe.listen("127.0.0.1", 0, timeout_s=60) as p:
        send = peers.start(P.one_tensor_sender, p.address)
        with pytest.raises(RemoteProtocolError, match="expected float32"):
            p.recv_tensor(out=torch.zeros(1000, dtype=torch.float32))
    assert peers.get(send, 60)[0] == "error"  # the sender learns the pipe is gone
