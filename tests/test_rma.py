"""One-sided RMA across real processes over real UCX: bit-exact scattered GET/PUT, misuse, peer death."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch

from tests import rma_peers
from transport import LocalUsageError
from transport._rma import MemoryDescriptor, plan_pieces
from transport.errors import RemoteProtocolError

TLS = ["tcp", "sm"]


def test_plan_pieces_coalesces_and_checks_bounds() -> None:
    # two contiguous runs (in shuffled order) and one lone piece
    lo, ro, ln = plan_pieces([12, 0, 8, 100], [12, 0, 8, 50], [4, 8, 4, 1], 200, 200)
    assert lo.tolist() == [0, 100] and ro.tolist() == [0, 50] and ln.tolist() == [16, 1]
    lo, ro, ln = plan_pieces(np.arange(4096) * 10, np.arange(4096) * 10, 10, 1 << 20, 1 << 20)
    assert lo.tolist() == [0] and ln.tolist() == [40960]
    with pytest.raises(LocalUsageError, match="piece 1 .* outside the remote registration of 100 bytes"):
        plan_pieces([0, 0], [0, 96], [4, 5], 100, 100)
    with pytest.raises(LocalUsageError, match="outside the local"):
        plan_pieces([2**62], [0], [1], 100, 100)
    with pytest.raises(LocalUsageError, match="negative"):
        plan_pieces([0], [-4], [1], 100, 100)
    with pytest.raises(LocalUsageError, match="integers"):
        plan_pieces([0.5], [0], [1], 100, 100)
    with pytest.raises(LocalUsageError, match="2 local offsets, 1 remote"):
        plan_pieces([0, 1], [0], [1, 1], 100, 100)


def test_descriptor_round_trip_and_hostile_bytes() -> None:
    d = MemoryDescriptor(owner="o", address=4096, nbytes=100, rkey=b"k", memory="host", status_address=8,
                         status_rkey=b"s", token=5)
    assert MemoryDescriptor.from_bytes(d.to_bytes(), "peer") == d
    raw = d.to_bytes()
    for bad, why in ((raw[:6], "bytes"), (b"XXXX" + raw[4:], "magic"), (raw[:4] + b"\x09\x00\x00\x00" + raw[8:], "v9"),
                     (raw[:8] + b"\xc1junk", "malformed"),
                     # any exception from hostile bytes is the protocol error: deep nesting, wrong types
                     (raw[:8] + b"\x91" * 10000, "malformed"), (raw[:8] + b"\x81\xa4type\x01", "malformed"),
                     (raw[:8] + b"\x82\xa4type\xb0MemoryDescriptor\xa5owner\x01", "malformed")):
        with pytest.raises(RemoteProtocolError, match=why):
            MemoryDescriptor.from_bytes(bad, "peer")
    import msgspec

    for field, value in (("nbytes", 0), ("address", 0), ("token", 0), ("memory", "disk"), ("rkey", b"")):
        evil = msgspec.structs.replace(d, **{field: value})
        with pytest.raises(RemoteProtocolError, match="memory descriptor from peer"):
            MemoryDescriptor.from_bytes(evil.to_bytes(), "peer")


def _run_get_put(peers, tls: str, owner_dev: str = "cpu", reader_dev: str = "cpu") -> None:
    own = peers.start(rma_peers.owner, tls, rma_peers.REGION, owner_dev)
    addr = peers.expect(own, "addr")
    rd = peers.start(rma_peers.reader, tls, addr, reader_dev)
    peers.expect(own, "ready")
    out = peers.expect(rd, "ok")
    res = peers.expect(own, "ok")
    assert out["get_ok"], "scattered GET is not bit-exact"
    assert res["put_ok"], "scattered PUT is not bit-exact"
    assert [("outside the remote" in e, "outside the local" in e, "negative" in e) for e in out["range_errors"]] == [
        (True, False, False), (False, True, False), (False, False, True)], out["range_errors"]
    assert out["untouched"] and out["untouched_after_stale"]
    assert "closed before the transfer (stale descriptor)" in out["stale"] and "owner-region" in out["stale"]
    assert out["stale_s"] < 5
    assert res["closed"] and "error" not in res, res


@pytest.mark.parametrize("tls", TLS)
def test_rma_get_put_bit_exact_bounds_and_stale(peers, tls: str) -> None:
    _run_get_put(peers, tls)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("owner_dev,reader_dev", [("cuda", "cuda"), ("cpu", "cuda"), ("cuda", "cpu")])
def test_rma_cuda_memory(peers, owner_dev: str, reader_dev: str) -> None:
    _run_get_put(peers, "default", owner_dev, reader_dev)


def _start_looping(peers, tls: str) -> tuple:
    """An owner of 64 MiB and a reader GETting all of it in a loop, already reading."""
    nbytes = 64 << 20
    own = peers.start(rma_peers.owner, tls, nbytes)
    addr = peers.expect(own, "addr")
    rd = peers.start(rma_peers.looping_reader, tls, addr, nbytes)
    peers.expect(own, "ready")
    peers.expect(rd, "ready")
    peers.expect(rd, "reading")
    time.sleep(0.3)
    return own, rd


@pytest.mark.parametrize("tls", TLS)
def test_rma_owner_killed_mid_get(peers, tls: str) -> None:
    own, rd = _start_looping(peers, tls)
    os.kill(own.pid, signal.SIGKILL)
    t = time.monotonic()
    res = peers.expect(rd, "ok", timeout=60)
    took = time.monotonic() - t
    assert res["error"] in ("PeerDeadError", "PeerTimeoutError", "PeerClosedError"), res
    assert took < 30, f"the reader needed {took:.1f}s to notice its owner died"
    assert res["rkeys_left"] == 0 and res["cleanup_s"] < 5, res
    rd.join(10)
    assert rd.exitcode == 0, f"reader exited with {rd.exitcode}"


@pytest.mark.parametrize("tls", TLS)
def test_rma_reader_killed_mid_get(peers, tls: str) -> None:
    own, rd = _start_looping(peers, tls)
    os.kill(rd.pid, signal.SIGKILL)
    res = peers.expect(own, "ok", timeout=60)
    assert res["error"] in ("PeerDeadError", "PeerTimeoutError", "PeerClosedError"), res
    assert res["closed"], res
    own.join(10)
    assert own.exitcode == 0, f"owner exited with {own.exitcode}"
