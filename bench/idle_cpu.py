"""Idle CPU of a Pipe: a listener with one connected idle peer, and a consumer waiting for data.

Run: ``python -m bench.idle_cpu [--seconds 30] [--tls sm] [--into]``. The listener (a
subprocess) accepts one peer and then does nothing; the consumer (this
process) connects and waits ``--seconds`` in ``recv_tensor`` for a tensor that
never comes (with ``--into``: in ``recv_tensors(out=[...])`` for a 64 KiB tensor, the compiled
receive's window, which sleeps in the engine's wait once its spin is over). Each side's CPU time over the idle window is its process CPU time
(user + system, all threads: the progress thread and the control plane's
heartbeats included), printed as a percentage of one core, with its wake-ups
per second (voluntary context switches, all threads: each is a sleep that
ended). The CPU a wake-up costs after a long sleep varies several-fold on a
small VM from day to day (0.3-5 ms in session 7, 0.7-8 ms in session 9), the
number of wake-ups does not: it is what the design sets.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time


def _wakeups() -> int:
    """Voluntary context switches of this process so far, all threads."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw


def _listener(q: "mp.Queue[object]", seconds: float) -> None:
    from transport import Pipe

    pipe = Pipe.listen()
    q.put(pipe.address)
    pipe.wait_connected(30)
    t0, c0, w0 = time.monotonic(), time.process_time(), _wakeups()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    q.put(((time.process_time() - c0) / elapsed, (_wakeups() - w0 - 1) / elapsed))  # (this thread's own sleep)
    time.sleep(2)  # let the consumer finish before the pipe closes
    pipe.close()


def measure(seconds: float, into: bool = False) -> tuple[tuple[float, float], tuple[float, float]]:
    """(listener, consumer), each (CPU time as a fraction of one core, wake-ups per second) over
    ``seconds`` idle; ``into``: the consumer waits in ``recv_tensors(out=...)`` instead of ``recv_tensor``.

    Uses the ``UCX_TLS`` of the environment for both processes.
    """
    import torch

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
            out = torch.empty(1 << 14) if into else None  # 64 KiB: a payload, received by the compiled window
            t0, c0, w0 = time.monotonic(), time.process_time(), _wakeups()
            try:
                if out is not None:
                    pipe.recv_tensors(out=[out], timeout=seconds)
                else:
                    pipe.recv_tensor(timeout=seconds)
                raise RuntimeError("a tensor arrived, but nobody sent one")
            except PeerTimeoutError:
                pass
            elapsed = time.monotonic() - t0
            consumer = ((time.process_time() - c0) / elapsed, (_wakeups() - w0) / elapsed)
            got = q.get(timeout=seconds + 60)
            listener = (float(got[0]), float(got[1]))  # type: ignore[index]
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
    ap.add_argument("--into", action="store_true", help="the consumer waits in recv_tensors(out=[...])")
    args = ap.parse_args()
    if args.tls:
        os.environ["UCX_TLS"] = args.tls
    (listener, l_wakes), (consumer, c_wakes) = measure(args.seconds, args.into)
    load = os.getloadavg()[0]
    how = "recv_tensors(out=) waiting" if args.into else "recv_tensor waiting"
    print(f"idle {args.seconds:.0f}s UCX_TLS={os.environ.get('UCX_TLS', 'default')} load={load:.2f}: "
          f"listener {listener * 100:.2f}% of a core, consumer ({how}) {consumer * 100:.2f}% of a core; "
          f"wake-ups per second: listener {l_wakes:.1f}, consumer {c_wakes:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
