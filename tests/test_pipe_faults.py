"""A peer killed with SIGKILL mid-transfer: the survivor raises a clear error in time."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests import peers as P

PEER_TIMEOUT = 2.0


@pytest.mark.parametrize("tls", ["tcp", "sm"])
def test_receiver_killed_mid_transfer_sender_raises(peers, tls):
    recv = peers.start(P.streaming_receiver, tls, PEER_TIMEOUT)
    addr = peers.expect(recv, "addr", 60)
    peers.expect(recv, "ready", 10)
    send = peers.start(P.streaming_sender, tls, addr, PEER_TIMEOUT)
    peers.expect(send, "ready", 60)
    time.sleep(1.0)  # let a few 64 MiB tensors flow
    os.kill(recv.pid, signal.SIGKILL)
    t0 = time.monotonic()
    msg = peers.get(send, 30)
    elapsed = time.monotonic() - t0
    assert msg[0] == "error", msg
    assert msg[1] in ("PeerDeadError", "PeerTimeoutError", "PeerClosedError"), msg
    assert f":{recv.pid}" in msg[2] or addr in msg[2], msg  # names the peer (its name host:pid, or its address)
    assert elapsed < PEER_TIMEOUT + 10, elapsed


@pytest.mark.parametrize("tls", ["tcp", "sm"])
def test_sender_killed_mid_transfer_receiver_raises(peers, tls):
    recv = peers.start(P.streaming_receiver, tls, PEER_TIMEOUT)
    addr = peers.expect(recv, "addr", 60)
    peers.expect(recv, "ready", 10)
    send = peers.start(P.streaming_sender, tls, addr, PEER_TIMEOUT)
    peers.expect(send, "ready", 60)
    time.sleep(1.0)
    os.kill(send.pid, signal.SIGKILL)
    t0 = time.monotonic()
    msg = peers.get(recv, 30)
    elapsed = time.monotonic() - t0
    assert msg[0] == "error", msg
    assert msg[1] in ("PeerDeadError", "PeerClosedError"), msg
    assert f":{send.pid}" in msg[2], msg  # names the peer (its name is host:pid)
    assert elapsed < PEER_TIMEOUT + 10, elapsed
