"""Process bodies for the RMA tests (tests/test_rma.py): an owner that registers memory, a reader that GETs/PUTs."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from tests.peers import _report, _set_tls

REGION = 16 << 20
CMD_VERIFY_PUT, CMD_DEREGISTER, CMD_EXIT = 1, 2, 3


def pattern(nbytes: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def scattered_pieces(n: int, nbytes: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` non-overlapping pieces of odd sizes in shuffled order, half of them in contiguous runs."""
    rng = np.random.default_rng(seed)
    slot = nbytes // n
    lengths = rng.integers(1, slot + 1, n)
    lengths[::2] = slot  # full slots: neighbours in both spaces coalesce
    remote = np.arange(n) * slot
    local_slots = np.arange(n)
    local_slots[n // 2:] = rng.permutation(local_slots[n // 2:])
    order = rng.permutation(n)
    return (local_slots * slot)[order], remote[order], lengths[order]


def put_pieces(n: int, nbytes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return scattered_pieces(n, nbytes, 7)


def owner(q: Any, tls: str, nbytes: int = REGION, device: str = "cpu") -> None:
    """Registers ``nbytes`` of pattern(seed 1), sends its descriptor, then obeys commands from the reader."""
    _set_tls(tls)
    from transport import Pipe, register

    def body() -> Any:
        p = Pipe.listen("127.0.0.1", 0, timeout_s=60, heartbeat_s=0.2, peer_timeout_s=2.0)
        q.put(("addr", p.address))
        region = pattern(nbytes, 1).to(device)
        reg = register(region, "owner-region")
        p.send_tensor(torch.frombuffer(bytearray(reg.descriptor().to_bytes()), dtype=torch.uint8))
        q.put(("ready", os.getpid()))
        result: dict[str, Any] = {}
        try:
            while True:
                cmd = int(p.recv_tensor(timeout=60)[0])
                if cmd == CMD_VERIFY_PUT:
                    lo, ro, ln = put_pieces(1000, nbytes)
                    src = pattern(nbytes, 2)
                    expect = pattern(nbytes, 1)
                    for a, b, n in zip(lo, ro, ln):
                        expect[b:b + n] = src[a:a + n]
                    result["put_ok"] = bool(torch.equal(region.cpu(), expect))
                    p.send_tensor(None)
                elif cmd == CMD_DEREGISTER:
                    reg.close()
                    reg.close()
                    p.send_tensor(None)
                else:
                    break
        except Exception as exc:  # noqa: BLE001 - the reader died: we must survive and clean up
            result["error"] = type(exc).__name__
            result["message"] = str(exc)
        reg.close()
        p.close()
        result["closed"] = reg.closed
        return result

    _report(q, body)


def _connect(address: str) -> tuple[Any, Any]:
    from transport import Pipe

    p = Pipe.connect(address, timeout_s=60, heartbeat_s=0.2, peer_timeout_s=2.0)
    desc = bytes(p.recv_tensor(timeout=60).numpy())
    return p, p.remote_memory(desc)


def _command(p: Any, cmd: int) -> None:
    p.send_tensor(torch.tensor([cmd]))
    p.recv_tensor(timeout=60)


def reader(q: Any, tls: str, address: str, device: str = "cpu") -> None:
    """Scattered GET and PUT checked bit for bit, an out-of-range piece, then a stale descriptor."""
    _set_tls(tls)
    from transport import LocalUsageError, StaleMemoryError, register

    def body() -> Any:
        out: dict[str, Any] = {}
        p, rm = _connect(address)
        local = torch.zeros(REGION, dtype=torch.uint8, device=device)
        reg = register(local, "reader-local")
        lo, ro, ln = scattered_pieces(3000, REGION, 3)
        out["bytes"] = rm.get(reg, lo, ro, ln)
        remote = pattern(REGION, 1)
        expect = torch.zeros(REGION, dtype=torch.uint8)
        for a, b, n in zip(lo, ro, ln):
            expect[a:a + n] = remote[b:b + n]
        out["get_ok"] = bool(torch.equal(local.cpu(), expect))
        # PUT: our pattern(seed 2) pieces into the owner's region; the owner checks.
        local.copy_(pattern(REGION, 2))
        lo, ro, ln = put_pieces(1000, REGION)
        rm.put(reg, lo, ro, ln)
        _command(p, CMD_VERIFY_PUT)
        # Out of range on either side: a clear error before anything is posted.
        before = local.clone()
        for args in (([0], [REGION - 8], 9), ([REGION - 8], [0], 9), ([0], [-1], 4)):
            try:
                rm.get(reg, *args)
                out.setdefault("range_errors", []).append("no error")
            except LocalUsageError as exc:
                out.setdefault("range_errors", []).append(str(exc))
        out["untouched"] = bool(torch.equal(local, before))
        # Stale: the owner deregisters; our descriptor must now be refused.
        _command(p, CMD_DEREGISTER)
        t = time.monotonic()
        try:
            rm.get(reg, [0], [0], 4096)
            out["stale"] = "no error"
        except StaleMemoryError as exc:
            out["stale"] = str(exc)
        out["stale_s"] = time.monotonic() - t
        out["untouched_after_stale"] = bool(torch.equal(local[:4096], before[:4096]))
        p.send_tensor(torch.tensor([CMD_EXIT]))
        rm.close()
        rm.close()
        reg.close()
        p.close()
        return out

    _report(q, body)


def looping_reader(q: Any, tls: str, address: str, nbytes: int) -> None:
    """GETs the whole region over and over until something fails; reports the error and its cleanup."""
    _set_tls(tls)
    from transport import register

    def body() -> Any:
        p, rm = _connect(address)
        reg = register(torch.zeros(nbytes, dtype=torch.uint8), "reader-local")
        lo = np.arange(0, nbytes, 65536)
        q.put(("ready", os.getpid()))
        t = None
        try:
            for i in range(1_000_000):
                if i == 1:
                    q.put(("reading", i))
                rm.get(reg, lo[::-1].copy(), lo, 65536, timeout=20)
            return {"error": "never failed"}
        except Exception as exc:  # noqa: BLE001
            t = time.monotonic()
            err = {"error": type(exc).__name__, "message": str(exc)}
        rm.close()
        reg.close()
        p.close()
        err["rkeys_left"] = len(rm._rkeys)
        err["cleanup_s"] = time.monotonic() - t
        return err

    _report(q, body)
