"""ucxx's own progress models, measured: 8-byte tag ping-pong and idle CPU, ucxx API only.

Run: ``python -m bench.progress_models [--tls sm|tcp] [-n 5000] [--variants a,b] [--idle 5]``.

Two processes on one host (this one and a ``spawn`` child) build a ``UCXContext`` and
``UCXWorker`` straight from ``ucxx._lib.libucxx`` (not our transport), exchange worker
addresses over a ``multiprocessing`` pipe and connect endpoints to each other's worker
address. The client sends 8 bytes (a pattern that changes every iteration), the server
sends back what it received, and the client checks the reply equals what it sent: a
variant that delivers wrong or stale bytes fails. One-way latency is half the round
trip, as ``ucx_perftest -t tag_lat`` and our ``tensor_lat -s 8``. Both processes run the
same variant. Variants (see :data:`VARIANTS`):

* ``thread-poll``: ucxx's C++ progress thread in polling mode
  (``start_progress_thread(polling_mode=True)``); Python loops on ``request.completed``.
* ``thread-block``: the progress thread in blocking mode (it sleeps on the worker's epoll
  fd, ``epoll_timeout`` ms at most, ucxx's async ``ThreadMode`` uses 1 ms); Python loops on
  ``request.completed``.
* ``thread-block-ds``: as ``thread-block`` with delayed submission (the request is posted
  by the progress thread, which Python wakes with ``ucp_worker_signal``): what ucxx's
  async layer enables by default with a progress thread.
* ``thread-notify``: the blocking progress thread, workers with Python futures
  (``enable_python_future=True``); the waiting thread blocks in
  ``wait_request_notifier`` (a C++ condition variable, GIL released) and then
  ``run_request_notifier`` sets the completed requests' futures, as ucxx's async
  notifier thread does, but synchronously in the waiting thread.
* ``spin``: no progress thread; Python calls ``worker.progress()`` until the request
  completes (reference).

Idle CPU, per process, over ``--idle`` seconds each (process CPU time, all threads, as a
fraction of one core): ``idle_thread`` with the progress thread running and the Python
thread asleep in ``time.sleep``; ``idle_wait`` with the Python thread waiting, the
variant's way, for a receive that never comes (``spin`` and the ``completed`` loops burn a
core there by construction).

The last column is UCP's thread mode of the client's worker (``ucp_worker_query``): ucxx
creates every worker ``UCS_THREAD_MODE_MULTI``, so UCP itself serializes concurrent calls.

``UCX_TLS=sm`` is rewritten to ``posix,sysv,self`` as our engine does (no cma), so the
figures compare with ``bench.perftest --tls sm``.
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing as mp
import os
import statistics
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger(__name__)

PING_TAG, PONG_TAG, NEVER_TAG = 0x7101, 0x7102, 0x7103
#: seconds any single wait (a request, a pipe message) may take before the run fails
STEP_TIMEOUT = 30.0


@dataclass(frozen=True)
class Variant:
    """One progress model: who progresses the worker and how the waiter learns of completion."""

    name: str
    thread: str | None  # None (no progress thread), "poll" or "block"
    completion: str  # "progress" (call worker.progress()), "flag" (loop on request.completed), "notify"
    delayed_submission: bool
    summary: str


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("thread-poll", "poll", "flag", False, "C++ progress thread polling; Python loops on request.completed"),
    Variant("thread-block", "block", "flag", False,
            "C++ progress thread on the worker's epoll fd; Python loops on request.completed"),
    Variant("thread-block-ds", "block", "flag", True,
            "as thread-block, requests posted by the progress thread (delayed submission)"),
    Variant("thread-notify", "block", "notify", False,
            "C++ progress thread on the epoll fd; waiter blocks in wait_request_notifier (Python futures)"),
    Variant("spin", None, "progress", False, "no progress thread; Python calls worker.progress() in a loop"),
)}


@dataclass
class Result:
    """One variant's figures (latencies in µs one-way, CPU as a fraction of one core)."""

    variant: str
    tls: str
    iterations: int
    verified: int
    thread_mode: str
    p50_us: float
    avg_us: float
    max_us: float
    idle_thread: float
    idle_wait: float
    peer_idle_thread: float
    peer_idle_wait: float


def ucx_config(tls: str | None) -> tuple[dict[str, str], bool]:
    """(UCXContext config, endpoint error handling) as our engine uses them for ``UCX_TLS=tls``.

    ``sm`` becomes ``posix,sysv,self`` (no cma); error handling only where a transport has it.
    Imported in the parent only: the child gets both, so it does not pay for importing transport.
    """
    from transport._engine import _has_error_handling, _safe_tls_config

    if tls:
        os.environ["UCX_TLS"] = tls
    config = _safe_tls_config() or {}
    return config, _has_error_handling(config.get("TLS", os.environ.get("UCX_TLS", "")))


_THREAD_MODES = {0: "SINGLE", 1: "SERIALIZED", 2: "MULTI"}


def worker_thread_mode(worker: Any) -> str:
    """UCP's thread mode of a ucxx ``UCXWorker`` (``ucp_worker_query``), e.g. ``MULTI``.

    ucxx asks for ``UCS_THREAD_MODE_MULTI``; UCP grants it only when built ``--enable-mt``. MULTI
    means UCP serializes calls on the worker (a progress thread's and ours) with its own lock.
    """
    import ctypes

    ucp = ctypes.CDLL("libucp.so.0")  # already loaded by ucxx: this finds that copy
    attr = (ctypes.c_uint8 * 512)()  # ucp_worker_attr_t: u64 field_mask, then the thread mode (enum)
    ctypes.c_uint64.from_buffer(attr, 0).value = 1  # UCP_WORKER_ATTR_FIELD_THREAD_MODE
    status = ucp.ucp_worker_query(ctypes.c_void_p(worker.handle), attr)
    if status != 0:
        raise RuntimeError(f"ucp_worker_query failed with UCX status {status}")
    mode = ctypes.c_int.from_buffer(attr, 8).value
    return _THREAD_MODES.get(mode, f"unknown ({mode})")


class _Side:
    """One process's ucxx context, worker, endpoint to the peer and waiting strategy."""

    def __init__(self, variant: Variant, config: tuple[dict[str, str], bool], epoll_timeout_ms: int) -> None:
        import ucxx._lib.libucxx as api
        from ucxx._lib.arr import Array

        self.api, self.Array, self.v = api, Array, variant
        self.error_handling = config[1]
        self.context = api.UCXContext(config[0], feature_flags=(api.Feature.TAG, api.Feature.WAKEUP))
        self.worker = api.UCXWorker(self.context, enable_delayed_submission=variant.delayed_submission,
                                    enable_python_future=variant.completion == "notify")
        if variant.delayed_submission and not self.worker.enable_delayed_submission:
            raise RuntimeError(f"{variant.name}: this ucxx build refused delayed submission")
        if variant.completion == "notify":
            if not self.worker.enable_python_future:
                raise RuntimeError(f"{variant.name}: this ucxx build has no Python future support")
            import asyncio

            # ucxx creates its futures with asyncio.Future(): the thread needs a current event loop,
            # which nothing runs: run_request_notifier only marks the futures done
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            self.worker.populate_python_futures_pool()
        self.tls = str(self.context.config.get("TLS"))
        self.address = bytes(self.worker.address.tobytes())
        self.ep: Any = None
        self.epoll_timeout_ms = epoll_timeout_ms

    def connect(self, peer_address: bytes) -> None:
        """Endpoint to the peer's worker; then start the variant's progress thread, if any."""
        addr = self.api.UCXAddress.create_from_buffer(peer_address)
        self.ep = self.worker.create_endpoint_from_worker_address(addr, self.error_handling)
        if self.v.thread is not None:
            self.worker.start_progress_thread(polling_mode=self.v.thread == "poll",
                                              epoll_timeout=self.epoll_timeout_ms)

    def send(self, buf: Any, tag: int) -> Any:
        return self.ep.tag_send(self.Array(buf), self.api.UCXXTag(tag))

    def recv(self, buf: Any, tag: int) -> Any:
        return self.worker.tag_recv(self.Array(buf), self.api.UCXXTag(tag))

    def wait(self, req: Any, what: str, timeout: float = STEP_TIMEOUT) -> None:
        """Wait for ``req`` the variant's way; raise TimeoutError naming ``what`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        how = self.v.completion
        if how == "progress":
            progress = self.worker.progress
            while not req.completed:
                progress()
                if time.monotonic() > deadline:
                    break
        elif how == "flag":
            while not req.completed:
                if time.monotonic() > deadline:
                    break
        else:
            fut = req.future
            self.worker.populate_python_futures_pool()
            while not fut.done():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.worker.wait_request_notifier(period_ns=int(min(left, 1.0) * 1e9))
                self.worker.run_request_notifier()
        if not req.completed:
            raise TimeoutError(f"{self.v.name}: {what} did not complete within {timeout:.0f} s")
        req.check_error()

    def idle(self, seconds: float) -> tuple[float, float]:
        """(progress thread only, waiter waiting for a receive that never comes), fractions of a core."""
        t0, c0 = time.monotonic(), time.process_time()
        time.sleep(seconds)
        thread_only = (time.process_time() - c0) / (time.monotonic() - t0)
        import numpy as np

        never = np.zeros(8, np.uint8)
        req = self.recv(never, NEVER_TAG)
        t0, c0 = time.monotonic(), time.process_time()
        try:
            self.wait(req, "a receive nobody sends", timeout=seconds)
            raise RuntimeError(f"{self.v.name}: a message nobody sent arrived")
        except TimeoutError:
            pass
        waiting = (time.process_time() - c0) / (time.monotonic() - t0)
        # unmatched: cancelled (and progressed) when the worker goes; the bytes were never sent
        return thread_only, waiting

    def close(self) -> None:
        """Close the endpoint (both sides do it between the same two barriers), stop the threads."""
        if self.ep is not None:
            self.ep.close_blocking(period=int(2e9), max_attempts=1)
        if self.v.thread is not None:
            self.worker.stop_progress_thread()
        if self.v.completion == "notify":
            # no stop_request_notifier_thread(): no notifier thread was started (the waiter waits on
            # the notifier itself), and stopping one marks it as running for the worker's destructor
            self.worker.clear_python_futures_pool()


def _recv_pipe(conn: Connection, what: str, timeout: float = STEP_TIMEOUT, proc: Any = None) -> Any:
    """The next message from the other process; TimeoutError naming ``what`` if none comes in time.

    With ``proc`` (the server process), a server that died fails at once, with its exit code.
    """
    deadline = time.monotonic() + timeout
    while not conn.poll(0.2):
        if proc is not None and not proc.is_alive():
            raise RuntimeError(f"progress_models: the server process exited (code {proc.exitcode}) "
                               f"before sending its {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"progress_models: no {what} from the other process within {timeout:.0f} s")
    return conn.recv()


def _server(conn: Connection, name: str, config: tuple[dict[str, str], bool], n: int, idle_s: float,
            epoll_timeout_ms: int) -> None:
    """The echo side: receive 8 bytes, send them back, ``n`` times; then idle; then close."""
    import numpy as np

    logging.basicConfig(level=os.environ.get("UCXKV_LOG_LEVEL", "WARNING"))
    side = _Side(VARIANTS[name], config, epoll_timeout_ms)
    conn.send(side.address)
    side.connect(_recv_pipe(conn, "client worker address"))
    buf = np.zeros(8, np.uint8)
    conn.send("ready")
    for i in range(n):
        side.wait(side.recv(buf, PING_TAG), f"ping {i} from the client")
        side.wait(side.send(buf, PONG_TAG), f"pong {i} to the client")
    conn.send(side.idle(idle_s))
    _recv_pipe(conn, "close barrier", STEP_TIMEOUT + idle_s * 2)
    side.close()
    conn.send("closed")


def run_variant(name: str, n: int, warmup: int = 200, idle_s: float = 5.0, tls: str | None = None,
                epoll_timeout_ms: int = 1) -> Result:
    """Ping-pong ``warmup + n`` times under variant ``name``; measure idle CPU on both sides.

    Raises ValueError for an unknown variant, RuntimeError if a reply differs from what was
    sent, TimeoutError (naming the step) if the peer or a request stalls.
    """
    import numpy as np

    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    if n < 1 or warmup < 0 or idle_s < 0:
        raise ValueError(f"need n >= 1, warmup >= 0, idle >= 0 (got {n}, {warmup}, {idle_s})")
    config = ucx_config(tls)
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_server, args=(there, name, config, n + warmup, idle_s, epoll_timeout_ms),
                       daemon=True)
    proc.start()
    try:
        side = _Side(VARIANTS[name], config, epoll_timeout_ms)
        peer_address = _recv_pipe(here, "server worker address", 60, proc)
        here.send(side.address)
        side.connect(peer_address)
        _recv_pipe(here, "server ready", proc=proc)
        out, back = np.zeros(8, np.uint8), np.zeros(8, np.uint8)
        words, times, verified = out.view(np.uint64), [], 0
        perf = time.perf_counter
        for i in range(n + warmup):
            words[0] = 0x5A5A_0000_0000_0000 + i
            back[:] = 0
            t0 = perf()
            rreq = side.recv(back, PONG_TAG)
            side.wait(side.send(out, PING_TAG), f"ping {i} to the server")
            side.wait(rreq, f"pong {i} from the server")
            dt = perf() - t0
            if not np.array_equal(back, out):
                raise RuntimeError(f"{name}: pong {i} is {back.tobytes().hex()}, sent {out.tobytes().hex()}")
            if i >= warmup:
                times.append(dt / 2 * 1e6)
                verified += 1
        idle_thread, idle_wait = side.idle(idle_s)
        peer_idle = _recv_pipe(here, "server idle CPU", STEP_TIMEOUT + idle_s * 2, proc)
        here.send("close")
        side.close()
        _recv_pipe(here, "server close", proc=proc)
        return Result(name, side.tls, n, verified, worker_thread_mode(side.worker), statistics.median(times), statistics.fmean(times),
                      max(times), idle_thread, idle_wait, float(peer_idle[0]), float(peer_idle[1]))
    finally:
        proc.join(10)
        if proc.is_alive():
            log.warning("progress_models: server of %s still running after the run; killing it", name)
            proc.kill()
            proc.join(5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tls", default=None, help="UCX_TLS for both processes (sm means posix,sysv,self, as our engine)")
    ap.add_argument("-n", type=int, default=5000, help="measured round trips per variant (5000)")
    ap.add_argument("-w", "--warmup", type=int, default=500, help="warm-up round trips (500)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds of each idle measurement (5)")
    ap.add_argument("--epoll-timeout-ms", type=int, default=1,
                    help="blocking progress thread's epoll timeout (1 ms, as ucxx's async ThreadMode; -1: none)")
    args = ap.parse_args(argv)
    from bench.perftest import PINNED_UCX_ENV

    for k, v in PINNED_UCX_ENV.items():  # same pinned settings as bench.perftest, before ucxx is imported
        os.environ.setdefault(k, v)
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    logging.basicConfig(level=os.environ.get("UCXKV_LOG_LEVEL", "WARNING"))
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    print(f"# 8 B tag ping-pong, one-way us, n={args.n} w={args.warmup}, idle {args.idle:g} s, "
          f"epoll timeout {args.epoll_timeout_ms} ms, load {os.getloadavg()[0]:.2f}")
    print(f"{'variant':<16} {'UCX_TLS':<18} {'p50':>8} {'avg':>8} {'max':>9} {'verified':>11} "
          f"{'idle_thread%':>12} {'idle_wait%':>10} {'peer_thread%':>12} {'peer_wait%':>10} {'ucp_thread_mode':>15}")
    rc = 0
    for name in names:
        try:
            r = run_variant(name, args.n, args.warmup, args.idle, args.tls, args.epoll_timeout_ms)
        except (RuntimeError, TimeoutError, OSError) as exc:
            print(f"{name:<16} FAILED: {exc}")
            rc = 1
            continue
        ok = all(math.isfinite(x) and x > 0 for x in (r.p50_us, r.avg_us))
        print(f"{r.variant:<16} {r.tls:<18} {r.p50_us:8.2f} {r.avg_us:8.2f} {r.max_us:9.1f} "
              f"{r.verified:>5}/{r.iterations:<5} {r.idle_thread * 100:12.2f} {r.idle_wait * 100:10.2f} "
              f"{r.peer_idle_thread * 100:12.2f} {r.peer_idle_wait * 100:10.2f} {r.thread_mode:>15}")
        rc |= 0 if ok else 1
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
