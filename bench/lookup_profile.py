"""Where one lookup round trip's time goes, on both sides: per-message CPU, then a two-process run.

Run: ``python -m bench.lookup_profile [--tls sm] [-n 3000] [--profile]``; to measure another
tree with this script, ``PYTHONPATH=<tree> python bench/lookup_profile.py``. Two parts:

* **messages**: the lookup wire's envelopes (a query: body and ``[tokens, None]``; an answer:
  body and ``[tokens, None, key]``, 8 B each, or ``[None, None, key]`` where the tokens are the
  query's own, wire v3's echo) and ``tensor_lat``'s bare 8 B tensor, each sent and
  then received in one thread of one process, ``time.thread_time_ns`` around every call (median
  of 20,000): what the transport costs per message, free of waiting.
* **round trip**: a producer process serves ``n`` pre-inserted entries, this process fetches
  each as ``bench.perftest -t lookup_lat`` does. Reported: the wall-clock median, each side's
  thread CPU per lookup (spinning included; the server's over all ``n``), the handler's ``_handle``
  CPU median, and how many receives found nothing within their spin and went to sleep on the worker. ``--profile`` adds
  cProfile of the client and of the server's handler thread (call counts per lookup).
* **several consumers** (``--consumers K``, K > 1; replaces the two parts above): one producer
  process serves K consumer processes that look up at once, each on its own pipe, so the server
  has K handler threads waiting on one worker. Reported: the server process's CPU (all threads)
  and its threads' voluntary context switches (each one a sleep that was woken), per lookup,
  over the timed lookups of all consumers. ``--pace-us`` makes each consumer pause after each lookup,
  so that the handlers sleep between lookups (the case where every event used to wake them all).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import multiprocessing as mp
import os
import pstats
import statistics
import time
from typing import Any

from bench.perftest import PINNED_UCX_ENV


def message_costs(count: int = 20000) -> dict[str, tuple[float, float]]:
    """Median thread CPU µs of (send, receive) per message shape over ``count`` each, one thread, one process."""
    import torch

    from transport import Pipe

    a = Pipe.listen()
    b = Pipe.connect(a.address)
    tt = time.thread_time_ns
    try:
        a.wait_connected(30)
        tok, key = torch.tensor([5], dtype=torch.int64), torch.full((8,), 3, dtype=torch.uint8)
        rb = torch.empty(8, dtype=torch.uint8)
        body = bytes(40)  # about a Fetch / Found body
        shapes = {"query send_message/recv_message": lambda: (b.send_message(body, [tok, None]), a.recv_message),
                  "answer send_message/recv_message": lambda: (b.send_message(body, [tok, None, key]),
                                                               a.recv_message),
                  # wire v3: tokens equal to the query's are not sent back (see _lookup_wire.Found.echo)
                  "echo answer send_message/recv_message": lambda: (b.send_message(body, [None, None, key]),
                                                                    a.recv_message),
                  "tensor_lat send_tensor/recv_tensor(out=)": lambda: (b.send_tensor(key),
                                                                       lambda: a.recv_tensor(out=rb))}
        out = {}
        for name, step in shapes.items():
            sends, recvs = [], []
            for _ in range(count):
                c0 = tt()
                _, recv = step()
                c1 = tt()
                recv()
                c2 = tt()
                sends.append(c1 - c0)
                recvs.append(c2 - c1)
            out[name] = (statistics.median(sends) / 1e3, statistics.median(recvs) / 1e3)
        return out
    finally:
        b.close()
        a.close()


def _count_waits(counts: dict[str, int]) -> None:
    """Count this process's fast-path receives and those that found nothing within their spin."""
    from transport import _engine

    recv_frame, wait = _engine.Engine.recv_frame, _engine.Engine.wait

    def counted_recv_frame(self: Any, *a: Any, **k: Any) -> Any:
        r = recv_frame(self, *a, **k)
        counts["receives"] += 1
        counts["slept"] += r is None
        return r

    def counted_wait(self: Any, *a: Any, **k: Any) -> Any:
        counts["engine_waits"] += 1
        return wait(self, *a, **k)

    _engine.Engine.recv_frame, _engine.Engine.wait = counted_recv_frame, counted_wait


def _stats_text(pr: cProfile.Profile, n: int) -> str:
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s)
    s.write(f"{st.total_calls / n:.0f} function calls per lookup\n")  # type: ignore[attr-defined]
    st.sort_stats("tottime").print_stats(30)
    return s.getvalue()


def _producer(q: Any, n: int, profile: bool) -> None:
    """Serve ``n`` entries; report the handler thread's CPU, counts and profile on ``q``."""
    import torch

    from kv_transfer import LookupBuffer, LookupServer

    counts = {"receives": 0, "slept": 0, "engine_waits": 0}
    _count_waits(counts)
    buf = LookupBuffer(1 << 22, lease_s=600)
    for i in range(n):
        buf.insert(torch.tensor([i], dtype=torch.int64), None, torch.full((8,), i % 251, dtype=torch.uint8), None,
                   None, request_id=f"r{i}", timeout=120)
    serve, handle = LookupServer._serve_pipe, LookupServer._handle
    handled: list[int] = []

    def timed_handle(self: Any, pipe: Any, msg: Any, tensors: Any) -> bool:
        c0 = time.thread_time_ns()
        try:
            return handle(self, pipe, msg, tensors)
        finally:
            handled.append(time.thread_time_ns() - c0)

    def profiled_serve(self: Any, pipe: Any) -> None:
        pr = cProfile.Profile() if profile else None
        c0 = time.thread_time_ns()
        if pr:
            pr.enable()
        try:
            serve(self, pipe)
        finally:
            if pr:
                pr.disable()
            cpu = time.thread_time_ns() - c0
            q.put({"cpu_us": cpu / max(1, len(handled)) / 1e3, "handle_us": statistics.median(handled) / 1e3,
                   "counts": counts, "profile": _stats_text(pr, len(handled)) if pr else ""})

    LookupServer._serve_pipe, LookupServer._handle = profiled_serve, timed_handle
    server = buf.serve("127.0.0.1", 0)
    q.put(server.address)
    while server.num_consumers == 0:
        time.sleep(0.05)
    while server.num_consumers:
        time.sleep(0.05)
    time.sleep(0.2)
    server.close()
    buf.close()


def round_trip(n: int, profile: bool) -> dict[str, Any]:
    """Fetch ``n`` entries from a producer process (the first 200 untimed); both sides' figures."""
    import torch

    from kv_transfer import LookupClient
    from transport import PipeOptions

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_producer, args=(q, n, profile), daemon=True)
    proc.start()
    try:
        address = q.get(timeout=300)
        counts = {"receives": 0, "slept": 0, "engine_waits": 0}
        _count_waits(counts)
        durs: list[float] = []
        pr = cProfile.Profile() if profile else None
        with LookupClient(address, options=PipeOptions(timeout_s=60)) as client:
            for i in range(n):
                if i == 200:
                    c0 = time.thread_time_ns()
                    if pr:
                        pr.enable()
                    counts.update(receives=0, slept=0, engine_waits=0)
                q_tokens = torch.tensor([i], dtype=torch.int64)
                t0 = time.perf_counter()
                got = client.drop_select(q_tokens, None, request_id=f"r{i}", wait_s=60.0)
                if i >= 200:
                    durs.append(time.perf_counter() - t0)
                if got[2] is None or int(got[2][0]) != i % 251:
                    raise RuntimeError(f"lookup {i} got the wrong entry")
            cpu = time.thread_time_ns() - c0
            if pr:
                pr.disable()
        server = q.get(timeout=60)
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.kill()
    m = len(durs)
    return {"p50_us": statistics.median(durs) * 1e6, "mean_us": statistics.mean(durs) * 1e6,
            "client_cpu_us": cpu / m / 1e3, "client_counts": counts, "client_profile": _stats_text(pr, m) if pr else "",
            "server": server}


def _wakes() -> int:
    """Voluntary context switches of this process's live threads so far (each one: a sleep, woken)."""
    total = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        total += int(line.split()[1])
        except OSError:
            pass  # that thread ended
    return total


def _multi_producer(q: Any, k: int, n: int, barrier: Any) -> None:
    """Serve ``k`` consumers ``n`` entries each; report the process's CPU and wake-ups over the timed part."""
    import torch

    from kv_transfer import LookupBuffer
    from transport._engine import get_engine

    buf = LookupBuffer(1 << 24, lease_s=600)
    for c in range(k):
        for i in range(n):
            buf.insert(torch.tensor([c * n + i], dtype=torch.int64), None,
                       torch.full((8,), i % 251, dtype=torch.uint8), None, None, request_id=f"r{c}_{i}", timeout=120)
    server = buf.serve("127.0.0.1", 0)
    q.put(server.address)
    counts = {"receives": 0, "slept": 0, "engine_waits": 0}
    _count_waits(counts)
    engine = get_engine()

    def engine_wakes() -> int:  # the engine's own count, where it keeps one
        return sum(engine.wake_counts().values()) if hasattr(engine, "wake_counts") else -1

    barrier.wait(300)  # every consumer connected and warmed up
    counts.update(receives=0, slept=0, engine_waits=0)
    c0, w0, e0, t0 = time.process_time(), _wakes(), engine_wakes(), time.monotonic()
    barrier.wait(600)  # every consumer done
    cpu, wakes, wall = time.process_time() - c0, _wakes() - w0, time.monotonic() - t0
    q.put({"cpu_s": cpu, "wakes": wakes, "wall_s": wall, "engine_wakes": engine_wakes() - e0, **counts})
    barrier.wait(60)
    server.close()
    buf.close()


def _multi_consumer(address: str, c: int, n: int, warm: int, pace_s: float, barrier: Any, q: Any) -> None:
    import torch

    from kv_transfer import LookupClient
    from transport import PipeOptions

    durs: list[float] = []
    with LookupClient(address, options=PipeOptions(timeout_s=60)) as client:
        for i in range(n):
            if i == warm:
                barrier.wait(300)
            t0 = time.perf_counter()
            got = client.drop_select(torch.tensor([c * n + i], dtype=torch.int64), None, request_id=f"r{c}_{i}",
                                     wait_s=60.0)
            if i >= warm:
                durs.append(time.perf_counter() - t0)
            if got[2] is None or int(got[2][0]) != i % 251:
                raise RuntimeError(f"consumer {c}: lookup {i} got the wrong entry")
            if pace_s:
                time.sleep(pace_s)
        barrier.wait(600)
        q.put(statistics.median(durs))
        barrier.wait(60)


def multi_consumer(k: int, n: int, pace_s: float = 0.0, warm: int = 200) -> dict[str, float]:
    """K consumer processes look up ``n`` entries each (the first ``warm`` untimed; each pausing ``pace_s``
    after every lookup) from one producer process."""
    ctx = mp.get_context("spawn")
    q, cq, barrier = ctx.Queue(), ctx.Queue(), ctx.Barrier(k + 1)
    prod = ctx.Process(target=_multi_producer, args=(q, k, n, barrier), daemon=True)
    prod.start()
    procs = []
    try:
        address = q.get(timeout=300)
        procs = [ctx.Process(target=_multi_consumer, args=(address, c, n, warm, pace_s, barrier, cq), daemon=True)
                 for c in range(k)]
        for p in procs:
            p.start()
        srv = q.get(timeout=900)
        p50s = [cq.get(timeout=60) for _ in range(k)]
        for p in procs + [prod]:
            p.join(60)
    finally:
        for p in procs + [prod]:
            if p.is_alive():
                p.kill()
    m = k * (n - warm)
    return {"server_cpu_us": srv["cpu_s"] / m * 1e6, "server_wakes": srv["wakes"] / m,
            "engine_wakes": srv["engine_wakes"] / m, "slept": srv["slept"] / m, "waits": srv["engine_waits"] / m,
            "lookups_per_s": m / srv["wall_s"], "p50_us": statistics.median(p50s) * 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tls", default="sm", help="UCX_TLS for both processes (sm)")
    ap.add_argument("-n", type=int, default=3000, help="lookups in the round-trip run (3000, the first 200 untimed)")
    ap.add_argument("-m", "--messages", type=int, default=20000, help="messages per shape (20000)")
    ap.add_argument("--profile", action="store_true", help="cProfile both sides of the round trip")
    ap.add_argument("--consumers", type=int, default=1,
                    help="K > 1: K consumer processes at once, per-lookup server CPU and wake-ups (see above)")
    ap.add_argument("--pace-us", type=float, default=0.0,
                    help="with --consumers: each consumer pauses this long after every lookup (0: none), so the "
                         "server's handlers sleep between lookups instead of catching the next within their spin")
    args = ap.parse_args()
    os.environ["UCX_TLS"] = args.tls
    for k, v in PINNED_UCX_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    if args.consumers > 1:
        load = os.getloadavg()[0]
        r = multi_consumer(args.consumers, args.n, args.pace_us * 1e-6)
        print(f"UCX_TLS={args.tls} {args.consumers} consumers x {args.n - 200} timed lookups, pace {args.pace_us:.0f} us, "
              f"load={load:.2f}: server "
              f"CPU {r['server_cpu_us']:.1f} us and {r['server_wakes']:.2f} wake-ups per lookup (engine's count "
              f"{r['engine_wakes']:.2f}; receives that slept {r['slept']:.2f}, engine waits {r['waits']:.2f}), "
              f"{r['lookups_per_s']:.0f} lookups/s, consumer p50 (median of consumers) {r['p50_us']:.1f} us; "
              f"load={os.getloadavg()[0]:.2f}")
        return 0
    print(f"UCX_TLS={args.tls} load={os.getloadavg()[0]:.2f}; per message, thread CPU, median of {args.messages}:")
    for name, (s, r) in message_costs(args.messages).items():
        print(f"  {name:47s} {s:5.1f} / {r:5.1f} us")
    res = round_trip(args.n, args.profile)
    srv = res["server"]
    print(f"round trip ({args.n - 200} lookups): p50 {res['p50_us']:.1f} us, mean {res['mean_us']:.1f} us; "
          f"thread CPU per lookup (spinning included): client {res['client_cpu_us']:.1f} us, server handler "
          f"{srv['cpu_us']:.1f} us (its _handle p50 {srv['handle_us']:.1f} us); receives / slept after the "
          f"spin: client {res['client_counts']['receives']} / {res['client_counts']['slept']}, server "
          f"{srv['counts']['receives']} / {srv['counts']['slept']}; load={os.getloadavg()[0]:.2f}")
    if args.profile:
        print("== client ==\n" + res["client_profile"] + "\n== server handler thread ==\n" + srv["profile"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
