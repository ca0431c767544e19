"""Parallel deployments through UcxConnector, longer tier (``slow``): each test starts its own servers.

* P TP 1 (core 0) -> D TP 2 (``"1|1"``): each decode rank reads only its head of the one
  prefill rank's entry (the prefill server narrows it), which is shared by both and then dropped.
* A prefill rank killed after staging (P TP 2 -> D TP 2): the decode rank reading it fails,
  the request is recomputed (same answer), decode keeps serving. vLLM itself stops a
  prefill instance one of whose workers died, so only decode is asked to keep serving.
* Data parallelism: a prefill with ``--data-parallel-size 2`` (two engine cores, one API
  server): the kv_transfer_params name the DP engine that ran each request (port
  ``kv_port + dp_index``), decode (TP 1) loads from both.

Run under ``flock /tmp/vllm.lock``: ``pytest -m slow tests/test_vllm_parallel_slow.py``.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import time
from typing import Any

import pytest

pytest.importorskip("vllm")

from bench._ports import free_port  # noqa: E402
from bench.tiny_model import make_tiny_model, sample_prompts  # noqa: E402
from tests.vllm_pd import decode, kv_config, loaded, prefill, reference, staged, start_servers  # noqa: E402
from tests.vllm_server import TP_MODEL_SHAPE  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("model") / "m", **TP_MODEL_SHAPE))


@contextlib.contextmanager
def pair(model: str, tmp: pathlib.Path, prefill_spec: dict, decode_spec: dict, **decode_extra: Any):
    """A prefill (its KV on a free port) and a decode server; yields (prefill, decode, kv_port)."""
    port = free_port()
    slow_start = dict(ready_timeout_s=480.0)  # a DP 2 prefill took >240 s to start on a loaded 2-core machine
    with start_servers(model, tmp, {
        "p": dict(prefill_spec, kv_transfer_config=kv_config("kv_producer", kv_port=port), **slow_start),
        "d": dict(decode_spec, kv_transfer_config=kv_config("kv_consumer", **decode_extra), **slow_start),
    }) as s:
        yield s["p"], s["d"], port


def test_p1_d2_each_decode_rank_reads_its_head_slice(model, tmp_path):
    with pair(model, tmp_path, dict(tp=1, cores="0"), dict(tp=2, cores="1|1")) as (p1, d2, port):
        prompts = sample_prompts(3, 40, 150, seed=401)
        want = reference(p1, prompts, 12)
        params = prefill(p1, prompts)
        assert {(p["remote_port"], p["remote_tp_size"]) for p in params} == {(port, 1)}
        before = loaded(d2)
        assert decode(d2, prompts, params, 12) == want
        assert [b - a for a, b in zip(before, loaded(d2))] == [len(prompts)] * 2
        assert staged(port) == 0  # one entry per request, shared by both decode ranks, then dropped
        noisy = sample_prompts(3, 40, 150, seed=402)
        assert decode(d2, noisy, prefill(p1, noisy), 12, ucxkv_debug_perturb_rank=1) != reference(p1, noisy, 12)


def test_prefill_rank_killed_after_staging_decode_recomputes_and_keeps_serving(model, tmp_path):
    with pair(model, tmp_path, dict(tp=2, cores="0|0"), dict(tp=2, cores="1|1"), fetch_timeout_s=5) as (p2, d2, _):
        prompts = sample_prompts(2, 40, 150, seed=501)
        want = reference(d2, prompts, 12)
        params = prefill(p2, prompts)
        victim = next(r["pid"] for r in p2.rpc("ucxkv_pid") if r["tp_rank"] == 1)
        os.kill(victim, signal.SIGKILL)  # rank 1's KV server goes with it
        totals = {r["tp_rank"]: r for r in d2.rpc("ucxkv_totals")}
        t0 = time.monotonic()
        assert decode(d2, prompts, params, 12) == want  # rank 1's load failed: recomputed
        assert time.monotonic() - t0 < 60  # bounded by the fetch timeout, no rank left waiting
        after = {r["tp_rank"]: r for r in d2.rpc("ucxkv_totals")}
        assert after[1]["load_failures"] - totals[1]["load_failures"] == len(prompts)
        assert after[0]["requests_loaded"] + after[0]["load_failures"] - totals[0]["requests_loaded"] \
            - totals[0]["load_failures"] == len(prompts)  # rank 0 finished each of its reads, either way
        fresh = sample_prompts(2, 40, 150, seed=502)
        assert decode(d2, fresh, [{}] * 2, 12) == reference(d2, fresh, 12)  # decode still serves


def test_dp2_prefill_params_name_the_engine_and_decode_loads_from_each(model, tmp_path):
    with pair(model, tmp_path, dict(dp=2, cores="0|0"), dict(tp=1, cores="1")) as (p, d, port):
        prompts = sample_prompts(6, 40, 150, seed=601)
        want = reference(d, prompts, 12)
        params = prefill(p, prompts, dp_ranks=[i % 2 for i in range(len(prompts))])
        engines = {(kp["remote_dp_index"], kp["remote_port"]) for kp in params}
        assert engines == {(0, port), (1, port + 1)}, engines  # each DP engine names its own port
        before = loaded(d)
        assert decode(d, prompts, params, 12) == want
        assert loaded(d)[0] - before[0] == len(prompts)
        assert [staged(port + i) for i in (0, 1)] == [0, 0]
