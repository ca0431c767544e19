"""The connector's worker half without a model: a prefill and a decode UcxWorker over the real transport (loopback).

Loaded (with prefix-cached blocks skipped), lease expired, producer absent, and
cancelled mid-load: each ends with the request reported and exactly the blocks
that did not arrive reported as load errors.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from bench._ports import free_port  # noqa: E402
from kv_transfer.tp_mapping import rank_heads  # noqa: E402
from kv_transfer.vllm import LoadSpec, RankInfo, SaveSpec, UcxConfig, UcxConnectorMetadata, UcxWorker  # noqa: E402

BS = 4


def _caches(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}": torch.randn(8, 2, BS, 16, generator=g) for i in range(2)}  # vLLM CPU layout


@pytest.fixture
def pair():
    yield from worker_pair(lease_s=1.0, verify_kv=True)


def worker_pair(**producer: Any):
    """A prefill and a decode UcxWorker (loopback, 8-block caches); ``producer``: more of prefill's settings."""
    port = free_port()
    prod = UcxWorker(UcxConfig(is_producer=True, is_consumer=False, kv_port=port, block_size=BS, **producer),
                     RankInfo(), num_blocks=8)
    cons = UcxWorker(UcxConfig(is_producer=False, is_consumer=True, kv_port=port, block_size=BS,
                               fetch_timeout_s=10, verify_kv=True), RankInfo(), num_blocks=8)
    src, dst = _caches(1), _caches(2)
    prod.register_kv_caches(src)
    cons.register_kv_caches(dst)
    try:
        yield prod, cons, src, dst, f"127.0.0.1:{port}"
    finally:
        for w in (cons, prod, cons, prod):  # shutting down twice is harmless
            w.shutdown()


def _finish(cons: UcxWorker, rid: str, timeout: float = 20.0) -> tuple[set[str], set[int]]:
    """Wait until the worker reports ``rid``'s load ended; returns (finished_sending, load-error blocks)."""
    sending: set[str] = set()
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        send, recv = cons.get_finished()
        sending |= send or set()
        if recv and rid in recv:
            return sending, cons.get_block_ids_with_load_errors()
        time.sleep(0.02)
    raise AssertionError(f"load of {rid} not reported within {timeout}s")


def _load(rid: str, remote: str, addr: str, blocks: list[int], skip: int = 0) -> UcxConnectorMetadata:
    return UcxConnectorMetadata(to_load=[LoadSpec(rid, remote, addr, list(range(10)), 10, blocks, skip)])


def test_loaded_into_own_blocks_skipping_prefix_cached_ones(pair):
    prod, cons, src, dst, addr = pair
    before = {k: v.clone() for k, v in dst.items()}
    prod.wait_for_save(UcxConnectorMetadata(to_save=[SaveSpec("p1", list(range(10)), [5, 1, 2])]))
    cons.start_load_kv(_load("d1", "p1", addr, [0, 3, 4], skip=1))
    assert _finish(cons, "d1") == (set(), set())
    for name in src:
        assert torch.equal(dst[name][[3, 4]], src[name][[1, 2]])
        assert torch.equal(dst[name][0], before[name][0])  # the prefix-cached block is not written
    totals = cons.counters.totals()
    assert totals["requests_loaded"] == 1 and totals["load_failures"] == 0 and totals["bytes_loaded"] > 0
    assert prod.counters.totals()["requests_saved"] == 1 and prod._buffer.bytes_used == 0


def test_expired_lease_and_absent_producer_fail_every_wanted_block(pair):
    prod, cons, src, dst, addr = pair
    prod.wait_for_save(UcxConnectorMetadata(to_save=[SaveSpec("p1", list(range(10)), [5, 1, 2])]))
    time.sleep(1.5)  # past the 1 s lease
    cons.start_load_kv(_load("d1", "p1", addr, [0, 3, 4], skip=1))
    assert _finish(cons, "d1") == (set(), {3, 4})
    assert prod._buffer.bytes_used == 0 and prod._buffer.expired == 1
    cons.start_load_kv(_load("d2", "p2", f"127.0.0.1:{free_port()}", [6, 7]))  # nobody listens there
    assert _finish(cons, "d2") == (set(), {6, 7})
    assert cons.counters.totals()["load_failures"] == 2 and cons.counters.totals()["requests_loaded"] == 0


def test_cancelled_load_frees_blocks_and_drops_the_producer_entry(pair):
    prod, cons, src, dst, addr = pair
    prod.wait_for_save(UcxConnectorMetadata(to_save=[SaveSpec("p1", list(range(10)), [5, 1, 2])]))
    meta = _load("d1", "p1", addr, [0, 3, 4])
    meta.cancel_loads = ["d1"]  # finished at decode before the worker got to it
    cons.start_load_kv(meta)
    sending, bad = _finish(cons, "d1")
    assert sending == {"d1"} and bad == {0, 3, 4}  # blocks released to vLLM, nothing claimed as loaded
    assert prod._buffer.bytes_used == 0  # the producer was told to drop the entry


# --- tensor parallelism below the engine: P prefill ranks, D decode ranks, each its own UcxWorker ---
H = 4  # total KV heads of the fake model (shards: 4 / 2 / 1 heads per rank for TP 1 / 2 / 4)


def _full(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, H, BS, 16, generator=g) for _ in range(2)]  # vLLM CPU layout, every head


def _shard(full: list[torch.Tensor], tp: int, rank: int) -> dict[str, torch.Tensor]:
    heads = rank_heads(H, tp, rank)
    return {f"layer{i}": t[:, heads.start:heads.stop].clone() for i, t in enumerate(full)}


def _tp_load(spec_tp: int, base: str, rid: str, blocks: list[int], kv_mode: str = "stage") -> UcxConnectorMetadata:
    return UcxConnectorMetadata(to_load=[LoadSpec(rid, "p1", base, list(range(10)), 10, blocks, 0,
                                                  remote_tp_size=spec_tp, total_kv_heads=H, kv_mode=kv_mode)])


@pytest.mark.parametrize("kv_mode", ["stage", "rma"])
@pytest.mark.parametrize("p,d", [(2, 2), (2, 1), (1, 2), (4, 2), (2, 4)])
def test_tp_ranks_read_their_heads_from_the_right_prefill_ranks(p, d, kv_mode):
    """Every decode rank ends with exactly its heads of prefill's blocks; every prefill entry (or rma lease) is gone."""
    base = free_port()
    cfg = dict(kv_port=base, block_size=BS, lease_s=30.0)
    prods = [UcxWorker(UcxConfig(is_producer=True, is_consumer=False, kv_mode=kv_mode, **cfg), RankInfo(q, p),
                       num_blocks=8) for q in range(p)]
    conss = [UcxWorker(UcxConfig(is_producer=False, is_consumer=True, fetch_timeout_s=10, **cfg),
                       RankInfo(r, d), num_blocks=8) for r in range(d)]
    src, dst = _full(1), _full(2)
    before = [t.clone() for t in dst]
    try:
        for q, w in enumerate(prods):
            w.register_kv_caches(_shard(src, p, q))
        dst_shards = [_shard(dst, d, r) for r in range(d)]
        for w, sh in zip(conss, dst_shards):
            w.register_kv_caches(sh)
        for w in prods:  # every prefill rank stages the same block ids (one block table per instance)
            server = w._server if kv_mode == "stage" else w._rma.server
            assert server.address.endswith(f":{base + w.rank.tp_rank}")
            w.wait_for_save(UcxConnectorMetadata(to_save=[SaveSpec("p1", list(range(10)), [5, 1, 2])]))
        for w in conss:
            w.start_load_kv(_tp_load(p, f"127.0.0.1:{base}", "d1", [0, 3, 4], kv_mode))
        for w in conss:
            assert _finish(w, "d1") == (set(), set())
        for r, sh in enumerate(dst_shards):
            heads = rank_heads(H, d, r)
            for i, name in enumerate(sh):
                assert torch.equal(sh[name][[0, 3, 4]], src[i][[5, 1, 2], heads.start:heads.stop])
                assert torch.equal(sh[name][[1, 2, 5, 6, 7]], before[i][[1, 2, 5, 6, 7], heads.start:heads.stop])
        if kv_mode == "stage":
            assert [w._buffer.bytes_used for w in prods] == [0] * p  # each entry dropped after its last reader
        else:  # each lease freed (the request reported sent) after its last reader's Done
            assert [w._rma.server.num_leases for w in prods] == [0] * p
            assert [w.get_finished()[0] for w in prods] == [{"p1"}] * p
        assert sum(w.counters.totals()["requests_loaded"] for w in conss) == d
    finally:
        for w in conss + prods:
            w.shutdown()


def test_tp_read_of_a_missing_prefill_rank_fails_the_whole_request_on_that_rank():
    """P 2 -> D 1: prefill rank 1 has no entry; decode's one rank reports every block failed."""
    base = free_port()
    cfg = dict(kv_port=base, block_size=BS, lease_s=30.0)
    prods = [UcxWorker(UcxConfig(is_producer=True, is_consumer=False, **cfg), RankInfo(q, 2), num_blocks=8)
             for q in range(2)]
    cons = UcxWorker(UcxConfig(is_producer=False, is_consumer=True, fetch_timeout_s=10, **cfg), RankInfo(0, 1),
                     num_blocks=8)
    src = _full(1)
    try:
        for q, w in enumerate(prods):
            w.register_kv_caches(_shard(src, 2, q))
        cons.register_kv_caches(_shard(_full(2), 1, 0))
        prods[0].wait_for_save(UcxConnectorMetadata(to_save=[SaveSpec("p1", list(range(10)), [5, 1, 2])]))
        cons.start_load_kv(_tp_load(2, f"127.0.0.1:{base}", "d1", [0, 3, 4]))
        assert _finish(cons, "d1") == (set(), {0, 3, 4})
        assert cons.counters.totals()["load_failures"] == 1
    finally:
        for w in [cons, *prods]:
            w.shutdown()


def test_corrupted_staged_kv_is_a_load_error_counted_as_integrity(pair):
    prod, cons, src, dst, addr = pair
    before = {k: v.clone() for k, v in dst.items()}
    prod.wait_for_save(UcxConnectorMetadata(to_save=[SaveSpec("p1", list(range(10)), [5, 1, 2], corrupt=True)]))
    cons.start_load_kv(_load("d1", "p1", addr, [0, 3, 4]))
    assert _finish(cons, "d1") == (set(), {0, 3, 4})  # every block reported, vLLM recomputes them
    assert all(torch.equal(dst[k], before[k]) for k in dst)  # nothing written
    totals = cons.counters.totals()
    assert totals["failed"] == {"load/integrity": 1} and totals["requests_loaded"] == 0
    stats = cons.get_kv_connector_stats().data
    assert stats["failed"] == {"load/integrity": 1} and stats["load_failures"] == 1
    # the producer's gauge follows its buffer: staged, then claimed
    prod.wait_for_save(UcxConnectorMetadata(to_save=[SaveSpec("p2", list(range(10)), [5, 1, 2])]))
    staged = prod.get_kv_connector_stats().data
    assert staged["staged_entries"] == {"tp0": 1} and staged["staged_bytes"]["tp0"] > 0
    assert staged["save_bytes"] == [3 * prod._block_bytes] * 2 and staged["requests_saved"] == 2
    cons.start_load_kv(_load("d2", "p2", addr, [0, 3, 4]))
    assert _finish(cons, "d2") == (set(), set())
    assert prod.get_kv_connector_stats().data["staged_bytes"] == {"tp0": 0}
