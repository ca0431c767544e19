"""Hostile input on the control port: rejected clearly, and the listener keeps serving."""

from __future__ import annotations

import socket
import struct
import time

import msgspec
import pytest
import zmq

from tests import peers as P
from transport import _wire
from transport._wire import Hello


def _dealer(address: str) -> zmq.Socket:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 5000)
    s.connect(f"tcp://{address}")
    return s


def _answer(s: zmq.Socket) -> _wire.ControlMessage:
    return _wire.decode(s.recv_multipart(), "test")


@pytest.fixture
def listener():
    from transport import Pipe

    p = Pipe.listen("127.0.0.1", 0, timeout_s=60)
    yield p
    p.close()


def test_wrong_version_garbage_truncated_and_oversized_are_rejected_then_a_good_peer_is_served(listener, peers):
    addr = listener.address
    s = _dealer(addr)

    # wrong protocol version: the answer names both versions
    body = msgspec.msgpack.encode(Hello(role="x", name="old", worker_address=b"", recv_tag=5))
    s.send_multipart([struct.pack("<4sI", _wire.MAGIC, 99), body])
    ans = _answer(s)
    assert isinstance(ans, _wire.Reject) and ans.code == "version"
    assert "v99" in ans.reason and f"v{_wire.PROTOCOL_VERSION}" in ans.reason

    # garbage frames
    s.send_multipart([b"\x00\xffgarbage", b"\x01" * 50])
    ans = _answer(s)
    assert isinstance(ans, _wire.Reject) and "malformed" in ans.reason

    # a valid preamble with an undecodable body (msgpack claiming a 4 GiB array)
    s.send_multipart([struct.pack("<4sI", _wire.MAGIC, _wire.PROTOCOL_VERSION), b"\xdd\xff\xff\xff\xff"])
    ans = _answer(s)
    assert isinstance(ans, _wire.Reject) and "malformed" in ans.reason

    # unknown message type, wrong frame count, truncated preamble
    s.send_multipart([struct.pack("<4sI", _wire.MAGIC, _wire.PROTOCOL_VERSION), msgspec.msgpack.encode({"type": "Nope"})])
    assert isinstance(_answer(s), _wire.Reject)
    s.send_multipart([b"one frame"])
    assert isinstance(_answer(s), _wire.Reject)
    s.send_multipart([b"UKV", b""])
    assert isinstance(_answer(s), _wire.Reject)

    # an oversized body (within ZeroMQ's frame cap, over ours): rejected unread
    s.send_multipart([struct.pack("<4sI", _wire.MAGIC, _wire.PROTOCOL_VERSION), b"\x00" * (_wire.MAX_CONTROL_BODY + 10)])
    ans = _answer(s)
    assert isinstance(ans, _wire.Reject) and "oversized" in ans.reason

    # a frame past ZeroMQ's MAXMSGSIZE: libzmq drops that connection without allocating it
    big = _dealer(addr)
    big.send_multipart([b"x", b"\x00" * (4 << 20)])
    time.sleep(0.3)

    # raw TCP garbage and an absurd ZMTP length claim
    for junk in (b"GET / HTTP/1.1\r\n\r\n", b"\xff" + b"\x00" * 8 + b"\x7f\xff\xff\xff\xff\xff\xff\xff" * 4):
        with socket.create_connection(("127.0.0.1", int(addr.rsplit(":", 1)[1])), timeout=5) as raw:
            raw.sendall(junk)
            time.sleep(0.1)

    assert listener._server.rejected >= 7

    # ... and a well-behaved peer in another process is still served
    send = peers.start(P.one_tensor_sender, addr)
    t = listener.recv_tensor(timeout=60)
    assert t.tolist() == list(range(1000))
    listener.send_tensor(None)
    assert peers.expect(send, "ok", 60) == "sent"


def test_second_peer_is_rejected_as_busy(listener, peers):
    from transport import Pipe, PeerRejectedError

    send = peers.start(P.one_tensor_sender, listener.address)
    assert listener.recv_tensor(timeout=60).numel() == 1000
    with pytest.raises(PeerRejectedError, match="busy"):
        Pipe.connect(listener.address, timeout_s=5)
    listener.send_tensor(None)
    peers.expect(send, "ok", 60)


def test_wrong_service_is_rejected():
    from transport import Pipe, PeerRejectedError, PipeListener

    with PipeListener(service="kvbuf") as lst:
        with pytest.raises(PeerRejectedError, match="kvbuf"):
            Pipe.connect(lst.address, timeout_s=5, service="pipe")
