"""Reference implementations ``ucxkv-perftest --baseline`` compares against.

* ``ucx_perftest``: the C benchmark bundled in the ``libucx`` wheel (``tag_bw`` /
  ``tag_lat``), server and client on loopback, one pair per size.
* ``pyzmq``: PUSH/PULL over tcp loopback with ``copy=False`` for bandwidth
  (the receiver pushes one ack back at the end), REQ/REP ping-pong for latency.
* ``gloo``: ``torch.distributed`` gloo ``send``/``recv`` between two processes.
* ``nixl``: for ``kv_bw``, NIXL's one-sided READ of the same blocks (``bench/_nixl.py``).

Each baseline returns a :class:`bench._report.Result` per size, or a string
saying why it was skipped. Both peers of a baseline run in child processes
with the environment the caller passes (the same explicit UCX settings as our
own processes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any, Sequence

from ._ports import free_port  # noqa: F401  (perftest and the peers below use it)
from ._report import Result, compute_rows, parse_csv, parse_table

log = logging.getLogger(__name__)

BASELINES = ("ucx_perftest", "pyzmq", "gloo", "nixl")


def uniform_result(test: str, size: int, impl: str, iters: int, elapsed_s: float, one_way_div: float = 1.0) -> Result:
    """A Final-only result when only the total time is known (every iteration taken as average)."""
    ends = [elapsed_s * (i + 1) / iters for i in range(iters)]
    res = compute_rows(test, size, ends, elapsed_s=elapsed_s, one_way_div=one_way_div, interval_s=float("inf"))
    res.impl = impl
    return res


# --------------------------------------------------------------------------- ucx_perftest
def libucx_paths() -> tuple[str, str]:
    """(path of the bundled ``ucx_perftest``, its ``lib`` directory)."""
    import libucx  # type: ignore[import-not-found]

    root = os.path.dirname(libucx.__file__)
    return os.path.join(root, "bin", "ucx_perftest"), os.path.join(root, "lib")


def ucx_perftest_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the bundled UCX libraries first on ``LD_LIBRARY_PATH``."""
    _, lib = libucx_paths()
    out = dict(env)
    out["LD_LIBRARY_PATH"] = lib + (os.pathsep + out["LD_LIBRARY_PATH"] if out.get("LD_LIBRARY_PATH") else "")
    return out


def run_ucx_perftest(test: str, size: int, iters: int, warmup: int, env: dict[str, str],
                     mem: str | None = None, outstanding: int | None = None, timeout_s: float = 120.0,
                     cpus: tuple[int, int] | None = None) -> Result:
    """Run ucx_perftest server + client on loopback for one size; parse the client's ``Final:`` row.

    Args:
        test: ``tag_bw`` or ``tag_lat`` (any UCP test name works).
        env: full environment for both processes (UCX_TLS etc. already in it).
        mem: ``-m`` value, e.g. ``host,cuda``; None leaves ucx_perftest's default.
        cpus: (server CPU, client CPU), each process pinned with ucx_perftest's own ``-c``.

    Raises:
        RuntimeError: the client failed (its output is in the message).
    """
    exe, _ = libucx_paths()
    penv = ucx_perftest_env(env)
    port = free_port()
    server = subprocess.Popen([exe, "-p", str(port)] + (["-c", str(cpus[0])] if cpus else []), env=penv,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cmd = [exe, "127.0.0.1", "-p", str(port), "-t", test, "-s", str(size), "-n", str(iters), "-w", str(warmup)]
        if cpus:
            cmd += ["-c", str(cpus[1])]
        if mem:
            cmd += ["-m", mem]
        if outstanding:
            cmd += ["-O", str(outstanding)]
        deadline = time.monotonic() + timeout_s
        last = ""
        while True:
            p = subprocess.run(cmd, env=penv, capture_output=True, text=True,
                               timeout=max(1.0, deadline - time.monotonic()))
            last = p.stdout + p.stderr
            rows = parse_table(p.stdout) or parse_csv(p.stdout)
            if p.returncode == 0 and rows:
                break
            # The server may not be listening yet: retry while it is alive and time remains.
            if server.poll() is not None or time.monotonic() > deadline - 1:
                raise RuntimeError(f"ucx_perftest client failed (rc={p.returncode}): {last.strip()[-2000:]}")
            time.sleep(0.2)
        res = Result(test=test, size=size, impl="ucx_perftest", final=rows[-1])
        res.info["tls"] = "UCX_TLS=" + env.get("UCX_TLS", "(unset: all)")
        res.info["command"] = " ".join(cmd)
        return res
    finally:
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# --------------------------------------------------------------------------- peers in child processes
def _spawn_pair(kind: str, test: str, sizes: Sequence[int], iters: int, warmup: int, env: dict[str, str],
                timeout_s: float, cpus: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    port = free_port()
    base = [sys.executable, "-m", "bench._baselines", kind, "--port", str(port), "--test", test,
            "--sizes", ",".join(map(str, sizes)), "--iters", str(iters), "--warmup", str(warmup)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    penv = dict(env)
    penv["PYTHONPATH"] = root + (os.pathsep + penv["PYTHONPATH"] if penv.get("PYTHONPATH") else "")
    server = subprocess.Popen(base + ["--role", "server"] + (["--cpu", str(cpus[0])] if cpus else []), env=penv,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = subprocess.run(base + ["--role", "client"] + (["--cpu", str(cpus[1])] if cpus else []), env=penv,
                                capture_output=True, text=True,
                                timeout=timeout_s)
        if client.returncode != 0:
            raise RuntimeError(f"{kind} client failed: {client.stderr.strip()[-2000:]}")
        return [json.loads(line) for line in client.stdout.splitlines() if line.startswith("{")]
    finally:
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _results(kind: str, test: str, rows: list[dict[str, Any]], iters: int) -> list[Result]:
    out = []
    for r in rows:
        if r.get("durs") is not None:
            res = compute_rows(test, r["size"], [sum(r["durs"][: i + 1]) for i in range(len(r["durs"]))],
                               durs_s=r["durs"], one_way_div=2.0, interval_s=float("inf"))
            res.impl = kind
        else:
            res = uniform_result(test, r["size"], kind, iters, r["elapsed"])
        out.append(res)
    return out


def run_pyzmq(test: str, sizes: Sequence[int], iters: int, warmup: int, env: dict[str, str],
          timeout_s: float = 300.0, cpus: tuple[int, int] | None = None) -> list[Result]:
    """pyzmq PUSH/PULL (bandwidth) or REQ/REP (latency) on tcp loopback, ``copy=False``."""
    return _results("pyzmq", test, _spawn_pair("pyzmq", test, sizes, iters, warmup, env, timeout_s, cpus), iters)


def run_gloo(test: str, sizes: Sequence[int], iters: int, warmup: int, env: dict[str, str],
         timeout_s: float = 300.0, cpus: tuple[int, int] | None = None) -> list[Result]:
    """torch.distributed gloo send/recv between two processes (preallocated receive buffers)."""
    return _results("gloo", test, _spawn_pair("gloo", test, sizes, iters, warmup, env, timeout_s, cpus), iters)


def nixl_available() -> bool:
    """Whether ``nixl_cu12`` imports here."""
    try:
        import nixl_cu12  # type: ignore[import-not-found]  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def nixl_skip_reason(test: str = "") -> str:
    """Why the NIXL baseline does not run for ``test``."""
    if not nixl_available():
        return "nixl_cu12 not importable (pip install --no-deps nixl-cu12 nixl)"
    return f"NIXL baseline runs only for kv_bw on host memory, not {test or 'this test'}"


# --------------------------------------------------------------------------- peer bodies
def _zmq_peer(role: str, port: int, test: str, sizes: list[int], iters: int, warmup: int) -> None:
    import numpy as np
    import zmq

    ctx = zmq.Context()
    lat = test.endswith("lat")
    if lat:
        s = ctx.socket(zmq.REP if role == "server" else zmq.REQ)
        (s.bind if role == "server" else s.connect)(f"tcp://127.0.0.1:{port}")
        socks = [s]
    else:
        data = ctx.socket(zmq.PULL if role == "server" else zmq.PUSH)
        ack = ctx.socket(zmq.PUSH if role == "server" else zmq.PULL)
        if role == "server":
            data.bind(f"tcp://127.0.0.1:{port}")
            ack.bind(f"tcp://127.0.0.1:{port + 1}")
        else:
            data.connect(f"tcp://127.0.0.1:{port}")
            ack.connect(f"tcp://127.0.0.1:{port + 1}")
        socks = [data, ack]
    for size in sizes:
        buf = np.ones(size, dtype=np.uint8)
        if lat:
            s = socks[0]
            durs = []
            for i in range(warmup + iters):
                if role == "server":
                    m = s.recv(copy=False)
                    s.send(m, copy=False)
                else:
                    t0 = time.perf_counter()
                    s.send(buf, copy=False)
                    s.recv(copy=False)
                    if i >= warmup:
                        durs.append(time.perf_counter() - t0)
            if role == "client":
                print(json.dumps({"size": size, "durs": durs}), flush=True)
        else:
            data, ack = socks
            for phase_n, timed in ((warmup, False), (iters, True)):
                if role == "server":
                    for _ in range(phase_n):
                        data.recv(copy=False)
                    ack.send(b"k")
                else:
                    t0 = time.perf_counter()
                    for _ in range(phase_n):
                        data.send(buf, copy=False)
                    ack.recv()
                    if timed:
                        print(json.dumps({"size": size, "elapsed": time.perf_counter() - t0}), flush=True)
    for s in socks:
        s.close(linger=1000)
    ctx.term()


def _gloo_peer(role: str, port: int, test: str, sizes: list[int], iters: int, warmup: int) -> None:
    import torch
    import torch.distributed as dist

    rank = 0 if role == "client" else 1
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    peer = 1 - rank
    lat = test.endswith("lat")
    try:
        for size in sizes:
            buf = torch.ones(size, dtype=torch.uint8)
            rbuf = torch.empty(size, dtype=torch.uint8)
            ackb = torch.zeros(1, dtype=torch.uint8)
            if lat:
                durs = []
                for i in range(warmup + iters):
                    t0 = time.perf_counter()
                    if rank == 0:
                        dist.send(buf, peer)
                        dist.recv(rbuf, peer)
                    else:
                        dist.recv(rbuf, peer)
                        dist.send(rbuf, peer)
                    if i >= warmup:
                        durs.append(time.perf_counter() - t0)
                if rank == 0:
                    print(json.dumps({"size": size, "durs": durs}), flush=True)
            else:
                for phase_n, timed in ((warmup, False), (iters, True)):
                    t0 = time.perf_counter()
                    for _ in range(phase_n):
                        if rank == 0:
                            dist.send(buf, peer)
                        else:
                            dist.recv(rbuf, peer)
                    if rank == 0:
                        dist.recv(ackb, peer)
                        if timed:
                            print(json.dumps({"size": size, "elapsed": time.perf_counter() - t0}), flush=True)
                    else:
                        dist.send(ackb, peer)
    finally:
        dist.destroy_process_group()


def _peer_main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench._baselines")
    ap.add_argument("kind", choices=["pyzmq", "gloo"])
    ap.add_argument("--role", choices=["server", "client"], required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--sizes", required=True)
    ap.add_argument("--iters", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    a = ap.parse_args(argv)
    if a.cpu is not None:
        os.sched_setaffinity(0, {a.cpu})
    sizes = [int(x) for x in a.sizes.split(",")]
    body = _zmq_peer if a.kind == "pyzmq" else _gloo_peer
    body(a.role, a.port, a.test, sizes, a.iters, a.warmup)


if __name__ == "__main__":
    _peer_main()
