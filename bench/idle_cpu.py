"""Idle CPU of a Pipe: a listener with one connected idle peer, and a consumer waiting for data.

Run: ``python -m bench.idle_cpu [--seconds 30] [--tls sm]``. The listener (a
subprocess) accepts one peer and then does nothing; the consumer (this
process) connects and waits ``--seconds`` in ``recv_tensor`` for a tensor that
never comes. Each side's CPU time over the idle window is its process CPU time
(user + system, all threads: the progress thread and the control plane's
heartbeats included), printed as a percentage of one core.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time


def _listener(q: "mp.Queue[object]", seconds: float) -> None:
    from transport import Pipe

    pipe = Pipe.listen()
    q.put(pipe.address)
    pipe.wait_connected(30)
    t0, c0 = time.monotonic(), time.process_time()
    time.sleep(seconds)
    q.put((time.process_time() - c0) / (time.monotonic() - t0))
    time.sleep(2)  # let the consumer finish before the pipe closes
    pipe.close()


def measure(seconds: float) -> tuple[float, float]:
    """(listener, consumer) CPU time over ``seconds`` idle, as fractions of one core.

    Uses the ``UCX_TLS`` of the environment for both processes.
    """
    from transport import Pipe
    from transport.errors import PeerTimeoutError

    ctx = mp.get_context("spawn")
    q: "mp.Queue[object]" = ctx.Queue()
    proc = ctx.Process(target=_listener, args=(q, seconds))
    proc.start()
    try:
        pipe = Pipe.connect(str(q.get(timeout=60)))
        try:
            pipe.wait_connected(30)
            t0, c0 = time.monotonic(), time.process_time()
            try:
                pipe.recv_tensor(timeout=seconds)
                raise RuntimeError("a tensor arrived, but nobody sent one")
            except PeerTimeoutError:
                pass
            consumer = (time.process_time() - c0) / (time.monotonic() - t0)
            listener = float(q.get(timeout=seconds + 60))  # type: ignore[arg-type]
        finally:
            pipe.close()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    return listener, consumer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--tls", default=None, help="UCX_TLS for both processes")
    args = ap.parse_args()
    if args.tls:
        os.environ["UCX_TLS"] = args.tls
    listener, consumer = measure(args.seconds)
    load = os.getloadavg()[0]
    print(f"idle {args.seconds:.0f}s UCX_TLS={os.environ.get('UCX_TLS', 'default')} load={load:.2f}: "
          f"listener {listener * 100:.2f}% of a core, consumer (recv_tensor waiting) {consumer * 100:.2f}% of a core")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
