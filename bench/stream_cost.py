"""Per-message CPU of a tensor stream, both sides: what ``tensor_bw`` does without its control messages.

Run: ``python -m bench.stream_cost [--size 65536] [-n 8000] [--tls sm] [--profile] [--split]`` (to measure
another tree: ``cd /tmp; PYTHONPATH=TREE python TREE2/bench/stream_cost.py``; ``-m`` imports the
current directory's ``transport`` first). A receiver
process waits on ``recv_tensors(out=[buf] * 8)`` batches while this process sends with
``send_tensor_async``, 8 in flight. Each side prints its process CPU time (all threads,
``getrusage``) per message, then per thread (CPU from ``/proc/self/task/*/schedstat``, voluntary and
involuntary context switches), its MB/s and, with ``--profile``, its cProfile call count per message
and top functions (``--split``: the sender thread's CPU in ``send_tensor_async`` apart from its CPU in
``wait``, which includes spinning for a slower receiver; ``--gap-us``: a caller that sleeps between
posts and waits on none until the end, instead of a stream); the receiver also prints where its compiled
receives stood when handed to the
ordinary path (``_ucp_tag.ST_*`` counts). CPU per message and call counts survive a loaded
machine far better than the MB/s (docs/bench.md, "Streaming through the compiled path").
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import resource
import time
from typing import Any

WINDOW = 8


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _threads() -> dict[int, tuple[str, int, int, int]]:
    """Each thread of this process: tid -> (name, CPU ns from schedstat, voluntary and involuntary
    context switches). Python threads by their name; others (UCX's) by their comm, in brackets."""
    import threading

    names = {t.native_id: t.name for t in threading.enumerate()}
    out = {}
    for tid in os.listdir("/proc/self/task"):
        base = f"/proc/self/task/{tid}"
        try:
            with open(f"{base}/schedstat") as f:
                ns = int(f.read().split()[0])
            with open(f"{base}/status") as f:
                st = dict(line.split(":", 1) for line in f if ":" in line)
            with open(f"{base}/comm") as f:
                comm = f.read().strip()
        except (OSError, ValueError):
            continue
        t = int(tid)
        out[t] = (names.get(t, f"[{comm}]"), ns, int(st["voluntary_ctxt_switches"]),
                  int(st["nonvoluntary_ctxt_switches"]))
    return out


def _per_thread(before: dict, after: dict, n: int) -> str:
    """CPU µs and context switches (voluntary + involuntary) per message, thread by thread."""
    parts = []
    for tid, (name, ns, vol, invol) in sorted(after.items(), key=lambda kv: -kv[1][1]):
        _, ns0, vol0, invol0 = before.get(tid, (name, 0, 0, 0))
        if ns - ns0 < 1000 * n / 100:  # under 0.01 µs a message: idle
            continue
        parts.append(f"{name} {(ns - ns0) / 1e3 / n:.1f} us, {(vol - vol0) / n:.2f}+{(invol - invol0) / n:.2f} cs")
    return "; ".join(parts)


def _measured(side: str, n: int, size: int, profile: bool, run: Any) -> str:
    """Run ``run()`` (the timed part) and describe it: CPU µs per message (all threads, then thread by
    thread with context switches per message), MB/s, calls per message."""
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    th0 = _threads()
    c0, t0 = _cpu(), time.perf_counter()
    run()
    c1, t1 = _cpu(), time.perf_counter()
    th1 = _threads()
    line = (f"{side}: {1e6 * (c1 - c0) / n:.1f} us CPU/message, {n * size / (t1 - t0) / 1e6:.0f} MB/s\n"
            f"  {side} threads: {_per_thread(th0, th1, n)}")
    if prof is not None:
        import io
        import pstats

        prof.disable()
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats("tottime").print_stats(12)
        line += f", {stats.total_calls / n:.0f} Python calls/message\n{out.getvalue()}"
    return line


def _receiver(q: Any, size: int, n: int, profile: bool) -> None:
    import torch

    from transport import Pipe, _ucp_tag
    from transport import pipe as pipe_mod

    names = {getattr(_ucp_tag, k): k for k in dir(_ucp_tag) if k.startswith("ST_")}
    states: collections.Counter = collections.Counter()
    hand_over = getattr(pipe_mod.Pipe, "_hand_over", None)  # (a tree without the compiled payload path: none)

    def counting(self: Any, fb: Any, slots: Any) -> None:
        states.update(names[c.state] for c in fb.arr)
        hand_over(self, fb, slots)

    if hand_over is not None:
        pipe_mod.Pipe._hand_over = counting  # type: ignore[method-assign]
    p = Pipe.listen(timeout_s=60)
    q.put(p.address)
    p.wait_connected(60)
    buf = torch.empty(size, dtype=torch.uint8)
    p.recv_tensor(timeout=60)  # the sender is up

    def run() -> None:
        done = 0
        while done < n:
            k = min(WINDOW, n - done)
            p.recv_tensors(out=[buf] * k, timeout=60)
            done += k

    line = _measured("receiver", n, size, profile, run)
    p.send_tensor(None)
    q.put(f"{line}\nreceiver compiled slots at hand-over: {dict(states)}")
    p.recv_tensor(timeout=60)
    p.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=65536, help="bytes per tensor")
    ap.add_argument("-n", type=int, default=8000, help="messages")
    ap.add_argument("--tls", default="sm", help="UCX_TLS of both sides")
    ap.add_argument("--profile", action="store_true", help="cProfile both sides (slower)")
    ap.add_argument("--split", action="store_true",
                    help="also the sender thread's CPU in send_tensor_async and in wait, apart (thread_time)")
    ap.add_argument("--gap-us", type=float, default=0.0,
                    help="a caller that is not streaming: sleep this long after each post and wait on none "
                         "until all are posted (the progress thread moves them meanwhile)")
    args = ap.parse_args()
    os.environ["UCX_TLS"] = args.tls
    import torch

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    rx = ctx.Process(target=_receiver, args=(q, args.size, args.n, args.profile), daemon=True)
    rx.start()
    from transport import Pipe

    p = Pipe.connect(q.get(timeout=120), timeout_s=60)
    t = torch.ones(args.size, dtype=torch.uint8)
    p.send_tensor(None)

    split = [0.0, 0.0]  # --split: this thread's CPU in send_tensor_async, in wait

    def run() -> None:
        inflight: collections.deque = collections.deque()
        for _ in range(args.n):
            if len(inflight) >= WINDOW:
                inflight.popleft().wait(60)
            inflight.append(p.send_tensor_async(t))
        while inflight:
            inflight.popleft().wait(60)
        p.recv_tensor(timeout=60)  # the receiver has them all

    def run_gaps() -> None:
        posted = [p.send_tensor_async(t)]
        for _ in range(args.n - 1):
            time.sleep(args.gap_us * 1e-6)
            posted.append(p.send_tensor_async(t))
        for h in posted:
            h.wait(60)
        p.recv_tensor(timeout=60)

    def run_split() -> None:
        clock = time.thread_time
        inflight: collections.deque = collections.deque()
        for _ in range(args.n):
            if len(inflight) >= WINDOW:
                c0 = clock()
                inflight.popleft().wait(60)
                split[1] += clock() - c0
            c0 = clock()
            inflight.append(p.send_tensor_async(t))
            split[0] += clock() - c0
        while inflight:
            inflight.popleft().wait(60)
        p.recv_tensor(timeout=60)

    body = run_gaps if args.gap_us > 0 else run_split if args.split else run
    line = _measured("sender", args.n, args.size, args.profile, body)
    if args.split:
        line += (f"\nsender split: {1e6 * split[0] / args.n:.1f} us CPU/message in send_tensor_async, "
                 f"{1e6 * split[1] / args.n:.1f} in wait (spinning for the receiver included), the rest in "
                 f"other threads (the progress thread)")
    print(q.get(timeout=120))
    print(line)
    p.send_tensor(None)
    p.close()
    rx.join(30)


if __name__ == "__main__":
    main()
