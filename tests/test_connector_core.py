"""Connector core: in-process over a local LookupBuffer (no UCX), then 200 requests per case across processes."""

from __future__ import annotations

import pytest
import torch

from kv_transfer import (
    KVConsumer,
    KVProducer,
    KVRequest,
    KVUsageError,
    LookupBuffer,
    MultiProducerClient,
    PagedLayout,
)
from tests import kv_peers as K


@pytest.mark.parametrize("layout_name", ["vllm_cpu", "flash_attn"])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16"])
def test_local_save_load_bit_exact(layout_name, dtype_name):
    src = K.make_case(layout_name, dtype_name, 7, "src")
    dst = K.make_case(layout_name, dtype_name, 7, "dst")
    buf = LookupBuffer(64 << 20)
    KVProducer(buf, src["caches"], src["layout"]).save(src["reqs"])
    res = KVConsumer(buf, dst["caches"], dst["layout"], wait_s=0).load(dst["reqs"])
    assert all(r.ok and not r.failed_block_ids for r in res.values())
    assert K.check_case(layout_name, dtype_name, 7, dst) == []
    assert buf.bytes_used == 0


def _small(layout: PagedLayout, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    shape = (16, 2, 4, 8) if layout.block_dim == 0 else (2, 16, 4, 2, 4)
    return [torch.randn(shape, generator=g) for _ in range(3)]


def test_missing_entry_reports_every_block_failed_and_touches_nothing():
    lay = PagedLayout.vllm_cpu()
    dst = _small(lay, 1)
    before = [c.clone() for c in dst]
    res = KVConsumer(LookupBuffer(1 << 20), dst, lay).load([KVRequest("r", [1, 2, 3], [4, 5])], wait_s=0.05)
    assert not res["r"].ok and res["r"].failed_block_ids == [4, 5] and "no entry for r" in res["r"].error
    assert all(torch.equal(a, b) for a, b in zip(before, dst))


def test_short_entry_fills_leading_blocks_and_reports_the_rest():
    lay = PagedLayout.flash_attn()
    src, dst = _small(lay, 1), _small(lay, 2)
    buf = LookupBuffer(1 << 20)
    KVProducer(buf, src, lay).save([KVRequest("r", [1, 2, 3], [3, 9])])
    res = KVConsumer(buf, dst, lay).load([KVRequest("r", [1, 2, 3], [0, 1, 2])], wait_s=0)
    r = res["r"]
    assert not r.ok and r.loaded_block_ids == [0, 1] and r.failed_block_ids == [2]
    assert torch.equal(dst[2][:, 1], src[2][:, 9])


def test_skipped_blocks_are_neither_written_nor_reported():
    """The consumer already holds the leading blocks (prefix cache): the load covers block_ids[skip:]."""
    lay = PagedLayout.vllm_cpu()
    src, dst = _small(lay, 1), _small(lay, 2)
    before = [c.clone() for c in dst]
    buf = LookupBuffer(1 << 20)
    KVProducer(buf, src, lay).save([KVRequest("r", [1, 2, 3], [3, 9, 4])])
    r = KVConsumer(buf, dst, lay).load([KVRequest("r", [1, 2, 3], [0, 1, 2], skip_blocks=1)], wait_s=0)["r"]
    assert r.ok and r.loaded_block_ids == [1, 2] and r.failed_block_ids == []
    assert all(torch.equal(d[0], b[0]) for d, b in zip(dst, before))  # block 0 untouched
    assert all(torch.equal(d[[1, 2]], s[[9, 4]]) for d, s in zip(dst, src))


def test_short_entry_with_skip_reports_exactly_the_range():
    lay = PagedLayout.vllm_cpu()
    src, dst = _small(lay, 1), _small(lay, 2)
    buf = LookupBuffer(1 << 20)
    cons = KVConsumer(buf, dst, lay, wait_s=0)
    KVProducer(buf, src, lay).save([KVRequest("r", [1, 2], [3, 9])])
    r = cons.load([KVRequest("r", [1, 2], [0, 1, 2, 5], skip_blocks=1)])["r"]
    assert not r.ok and r.loaded_block_ids == [1] and r.failed_block_ids == [2, 5] and "short entry" in r.error
    assert all(torch.equal(d[1], s[9]) for d, s in zip(dst, src))
    # an entry shorter than the skipped part: nothing written, the whole range failed
    KVProducer(buf, src, lay).save([KVRequest("q", [7], [3])])
    r = cons.load([KVRequest("q", [7], [0, 1, 2], skip_blocks=2)])["q"]
    assert not r.ok and r.loaded_block_ids == [] and r.failed_block_ids == [2]
    assert buf.bytes_used == 0  # found entries are consumed either way


def test_entry_longer_than_the_destination_is_refused_untouched():
    lay = PagedLayout.vllm_cpu()
    src, dst = _small(lay, 1), _small(lay, 2)
    before = [c.clone() for c in dst]
    buf = LookupBuffer(1 << 20)
    KVProducer(buf, src, lay).save([KVRequest("r", [1], [3, 9, 4])])
    r = KVConsumer(buf, dst, lay).load([KVRequest("r", [1], [0, 1])], wait_s=0)["r"]
    assert not r.ok and r.failed_block_ids == [0, 1] and "does not fit" in r.error
    assert all(torch.equal(a, b) for a, b in zip(before, dst))
    with pytest.raises(KVUsageError, match="skip_blocks 3 outside"):
        KVConsumer(buf, dst, lay).load([KVRequest("r", [1], [0, 1], skip_blocks=3)])


def test_entry_is_scoped_by_tokens_and_request_id():
    lay = PagedLayout.vllm_cpu()
    src, dst = _small(lay, 1), _small(lay, 2)
    buf = LookupBuffer(1 << 20)
    KVProducer(buf, src, lay).save([KVRequest("r", [1, 2, 3], [3])])
    cons = KVConsumer(buf, dst, lay, wait_s=0)
    assert not cons.load([KVRequest("r", [1, 2, 4], [0])])["r"].ok  # same id, other tokens
    assert not cons.load([KVRequest("x", [1, 2, 3], [0])])["x"].ok  # same tokens, other id
    assert cons.load([KVRequest("r", [1, 2, 3], [0])])["r"].ok


def test_layer_by_layer_and_hidden_and_abort():
    lay = PagedLayout.vllm_cpu()
    src, dst = _small(lay, 1), _small(lay, 2)
    buf = LookupBuffer(1 << 20)
    prod, cons = KVProducer(buf, src, lay), KVConsumer(buf, dst, lay, wait_s=0)
    req_p, req_c = KVRequest("r", [5, 6], [7, 8]), KVRequest("r", [5, 6], [1, 0])
    for layer in range(3):
        prod.save_layer(layer, [req_p])
    for layer in (2, 0, 1):
        assert cons.load_layer(layer, [req_c])["r"].ok
        assert torch.equal(dst[layer][[1, 0]], src[layer][[7, 8]])
    hid = torch.arange(4.0)
    prod.save([req_p], hidden={"r": hid})
    assert torch.equal(cons.load([req_c])["r"].hidden, hid)
    prod.save([req_p])
    prod.save_layer(0, [req_p])
    assert cons.abort("r") == 2 and buf.bytes_used == 0
    prod.save([req_p])
    assert prod.abort("r") == 1 and buf.bytes_used == 0
    with pytest.raises(KVUsageError, match="layer 3 outside"):
        prod.save_layer(3, [req_p])


def test_multi_producer_client_finds_the_entry_on_any_producer():
    lay = PagedLayout.vllm_cpu()
    src, dst = _small(lay, 1), _small(lay, 2)
    bufs = [LookupBuffer(1 << 20) for _ in range(3)]
    KVProducer(bufs[2], src, lay).save([KVRequest("r", [1], [3])])
    KVProducer(bufs[0], src, lay).save([KVRequest("q", [2], [4])])
    multi = MultiProducerClient(bufs, own=False)
    res = KVConsumer(multi, dst, lay, wait_s=0.2).load([KVRequest("r", [1], [0]), KVRequest("q", [2], [1]),
                                                         KVRequest("z", [3], [2])])
    assert res["r"].ok and res["q"].ok and not res["z"].ok
    assert all(b.bytes_used == 0 for b in bufs)


def test_two_hundred_requests_per_case_across_processes_bit_exact(peers):
    prod = peers.start(K.connector_producer, 11, 256 << 20)
    addr = peers.expect(prod, "addr", 60)
    cons = peers.start(K.connector_consumer, 11, addr)
    out = peers.expect(cons, "ok", 120)
    assert out["not_ok"] == [] and out["bad"] == [], (out["not_ok"][:5], out["bad"][:5])
    res = peers.expect(prod, "ok", 60)
    assert res["done"] and res["served"] == len(K.CASES) * K.N_REQUESTS and res["bytes_used"] == 0


@pytest.mark.parametrize("layout_name", ["vllm_cpu", "flash_attn"])
def test_load_heads_places_a_narrowed_shard_at_its_head_offset_and_shares_the_entry(layout_name):
    """Two 1-head consumers (decode TP 2) read one 2-head producer shard (prefill TP 1): each gets its head."""
    lay = getattr(PagedLayout, layout_name)()
    src = _small(lay, 1)  # 2 KV heads
    hd = lay.dims.index("head")
    buf = LookupBuffer(1 << 20)
    KVProducer(buf, src, lay).save([KVRequest("r", [1, 2, 3], [3, 9])])
    for head in (0, 1):
        dst = [c.narrow(hd, 0, 1).clone() for c in _small(lay, 2)]  # this rank's one head
        before = [c.clone() for c in dst]
        res = KVConsumer(buf, dst, lay).load_heads(KVRequest("r", [1, 2, 3], [5, 0]), head, 1, 0, readers=2)
        assert res.ok and res.loaded_block_ids == [5, 0], res.error
        for s, d, b in zip(src, dst, before):
            want = s.narrow(hd, head, 1)
            blk = lay.block_dim
            assert torch.equal(d.index_select(blk, torch.tensor([5, 0])), want.index_select(blk, torch.tensor([3, 9])))
            assert torch.equal(d.index_select(blk, torch.tensor([1, 2])), b.index_select(blk, torch.tensor([1, 2])))
        assert buf.num_entries == (1 if head == 0 else 0)  # kept for the second reader, then dropped
    # heads outside the producer's shard: refused by the producer, nothing written, the entry stays
    KVProducer(buf, src, lay).save([KVRequest("s", [1, 2, 3], [3])])
    dst = _small(lay, 3)
    res = KVConsumer(buf, dst, lay).load_heads(KVRequest("s", [1, 2, 3], [4]), 1, 2, 0)
    assert not res.ok and res.failed_block_ids == [4] and "narrow" in res.error and buf.num_entries == 1
