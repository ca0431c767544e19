"""``make demo``: disaggregated serving on this machine, end to end.

Builds a tiny random-weight model locally, starts a prefill and a decode vLLM
server wired with ``UcxConnector`` and the ``ucxkv-proxy`` in front of them, sends
a few prompts through the proxy, and prints each answer next to the answer of a
single instance (the decode server asked directly, computing the prompt itself),
then the KV-transfer statistics the servers report.

``DEMO_TP=2 make demo`` (or ``--tp 2``) runs both servers with tensor parallelism 2
(prefill's ranks pinned to core 0, decode's to core 1): each decode rank loads its KV
heads from the prefill rank holding them.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

from bench._ports import free_port
from bench.tiny_model import make_tiny_model, sample_prompts

ROOT = pathlib.Path(__file__).resolve().parent.parent


_free_port = free_port  # bench.disagg imports it from here


def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)


def _post(url: str, body: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _wait_health(name: str, url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode} before becoming healthy; see its log")
        if _get(url + "/health")[0] == 200:
            return
        time.sleep(1.0)
    raise SystemExit(f"{name} not healthy at {url} within {timeout:.0f}s")


def _vllm(model: str, port: int, role: str, kv_port: int, cpus: str, log: pathlib.Path,
          tp: int = 1, tmp: str | None = None) -> subprocess.Popen:
    cfg = {"kv_connector": "UcxConnector", "kv_connector_module_path": "kv_transfer.vllm_connector",
           "kv_role": role, "kv_load_failure_policy": "recompute",
           "kv_connector_extra_config": {"kv_host": "127.0.0.1", "kv_port": kv_port}}
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               VLLM_CPU_OMP_THREADS_BIND=cpus, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    if tmp is not None:  # vLLM's ipc sockets and file stores go there (a killed server leaves them)
        env["TMPDIR"] = tmp
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
           "--block-size", "32", "--no-enable-prefix-caching", "--kv-transfer-config", json.dumps(cfg)]
    if tp > 1:  # one KV server per rank: prefill's rank r serves on kv_port + r
        cmd += ["--tensor-parallel-size", str(tp), "--distributed-executor-backend", "mp"]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default=str(ROOT / "out" / "demo"))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for each server")
    ap.add_argument("--tp", type=int, default=int(os.environ.get("DEMO_TP", "1")),
                    help="tensor-parallel size of both servers (default: $DEMO_TP or 1)")
    ap.add_argument("--stats-wait", type=float, default=11.0,
                    help="seconds to wait for vLLM's periodic stats log line before reading it")
    args = ap.parse_args(argv)
    work = pathlib.Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = str(make_tiny_model(work / "model", num_layers=4, num_heads=4, num_kv_heads=2))
    print(f"model: {model} (tiny random-weight Llama, 4 layers, GQA 4 heads / 2 KV heads), TP {args.tp}")
    p_port, d_port, x_port, kv_port = (_free_port() for _ in range(4))
    procs: list[subprocess.Popen] = []
    shm_before = set(pathlib.Path("/dev/shm").glob("vllm_dist_*"))  # a TP > 1 shutdown leaves these behind
    tmp = tempfile.mkdtemp(prefix="vllm-tmp-")  # (short: a socket path has at most 107 bytes)
    try:
        # each instance's ranks on one core: a decode waiting for KV spins its cores (docs/parallel.md)
        prefill = _vllm(model, p_port, "kv_producer", kv_port, "|".join(["0"] * args.tp), work / "prefill.log",
                        args.tp, tmp)
        decode = _vllm(model, d_port, "kv_consumer", kv_port, "|".join(["1"] * args.tp), work / "decode.log",
                       args.tp, tmp)
        procs += [prefill, decode]
        proxy = subprocess.Popen(
            [sys.executable, "-m", "kv_transfer.proxy", "--port", str(x_port),
             "--prefill", f"http://127.0.0.1:{p_port}", "--decode", f"http://127.0.0.1:{d_port}"],
            stdout=(work / "proxy.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"))
        procs.append(proxy)
        print(f"starting prefill :{p_port}, decode :{d_port}, proxy :{x_port} (logs in {work}) ...", flush=True)
        t0 = time.monotonic()
        _wait_health("prefill", f"http://127.0.0.1:{p_port}", prefill, args.timeout)
        _wait_health("decode", f"http://127.0.0.1:{d_port}", decode, args.timeout)
        _wait_health("proxy", f"http://127.0.0.1:{x_port}", proxy, 60)
        print(f"all up in {time.monotonic() - t0:.0f}s\n")
        prompts = sample_prompts(args.prompts, 30, 120, seed=7)
        same = 0
        for i, prompt in enumerate(prompts):
            body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0}
            t1 = time.monotonic()
            disagg = _post(f"http://127.0.0.1:{x_port}/v1/completions", body)
            t_dis = time.monotonic() - t1
            single = _post(f"http://127.0.0.1:{d_port}/v1/completions", body)
            a, b = disagg["choices"][0]["text"], single["choices"][0]["text"]
            same += a == b
            print(f"[{i}] prompt ({len(prompt.split())} words): {prompt[:60]}...")
            print(f"    1P1D via proxy ({t_dis * 1000:.0f} ms): {a!r}")
            print(f"    single instance        : {b!r}   {'identical' if a == b else 'DIFFERENT'}")
        print(f"\n{same}/{len(prompts)} answers identical to the single instance")
        _, metrics = _get(f"http://127.0.0.1:{d_port}/metrics")
        lines = [ln for ln in metrics.splitlines() if "by_source" in ln and not ln.startswith("#")]
        print("\ndecode's prompt tokens by source (vLLM /metrics):")
        for ln in lines or ["(not reported by this vLLM)"]:
            print("   ", ln)
        time.sleep(args.stats_wait)  # vLLM logs connector stats with its periodic stats line
        stats = [ln.strip() for ln in (work / "decode.log").read_text().splitlines() if "bytes_loaded" in ln]
        stats += [ln.strip() for ln in (work / "prefill.log").read_text().splitlines() if "bytes_saved" in ln]
        print("\nUcxConnector transfer statistics (from the servers' logs):")
        for ln in stats[-4:] or ["(none logged yet)"]:
            print("   ", ln[-300:])
        return 0 if same == len(prompts) else 1
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        for seg in set(pathlib.Path("/dev/shm").glob("vllm_dist_*")) - shm_before:
            seg.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
