"""The connector's worker half without a model: a prefill and a decode UcxWorker over the real transport (loopback).

Loaded (with prefix-cached blocks skipped), lease expired, producer absent, and
cancelled mid-load: each ends with the request reported and exactly the blocks
that did not arrive reported as load errors.
"""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("vllm")

from bench._ports import free_port  # noqa: E402
from kv_transfer.vllm import LoadSpec, RankInfo, SaveSpec, UcxConfig, UcxConnectorMetadata, UcxWorker  # noqa: E402

BS = 4


def _caches(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}": torch.randn(8, 2, BS, 16, generator=g) for i in range(2)}  # vLLM CPU layout


@pytest.fixture
def pair():
    port = free_port()
    prod = UcxWorker(UcxConfig(is_producer=True, is_consumer=False, kv_port=port, block_size=BS, lease_s=1.0,
                               verify_kv=True), RankInfo(), num_blocks=8)
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
