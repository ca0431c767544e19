"""What a few microseconds of Python cost when other work ran on the core just before (one process).

Run: ``python -m bench.cold_code [-n 3000]``. It times one lookup request's client-side Python (a
query tensor, ``check_query``, a ``Fetch`` and its encoding: what ``LookupClient.fetch`` does before it
sends) back to back, then with other work between two calls: a 50 µs Python busy loop, a 50 µs
``usleep`` in C, and a ``memset`` over 2 MiB and 8 MiB (what a 1-8 MiB transfer does to the caches).
Printed: the median per call of each. Every per-message path of the transport runs this way, between
spins in C and other processes' work, so its Python costs the second figure, not the first
(docs/bench.md, "Why a message's Python costs 3-4 times its warm figure").
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from typing import Callable


def _request_python(i: int) -> bytes:
    import torch

    from kv_transfer import _lookup_wire as wire
    from kv_transfer.lookup_source import check_query

    t = torch.tensor([i], dtype=torch.int64)
    check_query(t, None, "drop_select")
    return wire.encode(wire.Fetch(i, f"r{i}", False, 1, 60.0, None, 1))


def _between() -> dict[str, Callable[[int], object]]:
    libc = ctypes.CDLL(None)
    big = (ctypes.c_char * (8 << 20))()

    def py_spin(_: int) -> None:
        end = time.perf_counter() + 50e-6
        while time.perf_counter() < end:
            pass

    return {
        "back to back": lambda i: None,
        "after a 50 us Python busy loop": py_spin,
        "after usleep(50)": lambda i: libc.usleep(50),
        "after memset of 2 MiB": lambda i: ctypes.memset(big, i & 255, 2 << 20),
        "after memset of 8 MiB": lambda i: ctypes.memset(big, i & 255, 8 << 20),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=3000, help="calls per case")
    args = ap.parse_args(argv)
    for i in range(200):  # imports and first-call costs out of the way
        _request_python(i)
    for name, other in _between().items():
        times = []
        for i in range(args.n):
            other(i)
            t0 = time.perf_counter_ns()
            _request_python(i)
            times.append(time.perf_counter_ns() - t0)
        print(f"{name:32s} {statistics.median(times) / 1e3:6.2f} us per call (median of {args.n})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
