"""KV integrity: per-block checksums computed at staging, checked before decode writes (fail closed)."""

from __future__ import annotations

import pytest
import torch

from kv_transfer import KVConsumer, KVProducer, KVRequest, LookupBuffer, PagedLayout
from kv_transfer.integrity import IntegrityError, block_sums, flip_one_byte, verify_block_sums
from tests import kv_peers as K


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
def test_any_flipped_bit_or_swapped_block_is_caught(dtype):
    g = torch.Generator().manual_seed(0)
    staging = torch.randint(-100, 100, (2, 5, 3, 7), generator=g).to(dtype)  # odd sizes: 32/8-bit words
    sums = block_sums(staging)
    assert sums.shape == (2, 5) and sums.dtype == torch.int64
    verify_block_sums(list(staging.unbind(0)), sums, "ok")
    raw = staging.reshape(-1).view(torch.uint8)
    for pos in (0, raw.numel() // 2, raw.numel() - 1):
        for bit in (0, 7):
            bad = staging.clone()
            bad.reshape(-1).view(torch.uint8)[pos] ^= 1 << bit
            with pytest.raises(IntegrityError, match="checksum mismatch"):
                verify_block_sums(list(bad.unbind(0)), sums, "flipped")
    swapped = staging.clone()
    swapped[1, [0, 3]] = staging[1, [3, 0]]
    with pytest.raises(IntegrityError, match="layer 1 block 0"):
        verify_block_sums(list(swapped.unbind(0)), sums, "swapped")
    with pytest.raises(IntegrityError, match="no checksum"):
        verify_block_sums(list(staging.unbind(0)), None, "missing")
    with pytest.raises(IntegrityError, match="shape"):
        verify_block_sums(list(staging.unbind(0)), sums[:, :4], "short")


def _case():
    lay = PagedLayout.vllm_cpu()
    g = torch.Generator().manual_seed(1)
    src = [torch.randn(8, 2, 4, 8, generator=g) for _ in range(2)]
    dst = [torch.zeros(8, 2, 4, 8) for _ in range(2)]
    return lay, src, dst


def test_corrupted_entry_fails_closed_and_writes_nothing_in_process():
    lay, src, dst = _case()
    buf = LookupBuffer(1 << 20)
    prod = KVProducer(buf, src, lay, checksum=True)
    prod.save([KVRequest("bad", [1, 2], [3, 4])], tamper=flip_one_byte(block=1))
    prod.save([KVRequest("good", [5], [6])])
    res = KVConsumer(buf, dst, lay, wait_s=0.1, verify=True).load([KVRequest("bad", [1, 2], [0, 1]),
                                                                  KVRequest("good", [5], [2])])
    assert not res["bad"].ok and res["bad"].cause == "integrity" and res["bad"].failed_block_ids == [0, 1]
    assert "layer 0 block 1" in res["bad"].error
    assert all(torch.equal(d[:2], torch.zeros_like(d[:2])) for d in dst)  # nothing written
    assert res["good"].ok and all(torch.equal(d[2], s[6]) for d, s in zip(dst, src))
    # without verification the same corruption would have been used: the check is what stops it
    prod.save([KVRequest("bad2", [1, 2], [3, 4])], tamper=flip_one_byte(block=1))
    res = KVConsumer(buf, dst, lay, wait_s=0.1).load([KVRequest("bad2", [1, 2], [0, 1])])
    assert res["bad2"].ok and not torch.equal(dst[0][1], src[0][4])


def test_verifying_consumer_refuses_an_entry_without_checksum():
    lay, src, dst = _case()
    buf = LookupBuffer(1 << 20)
    KVProducer(buf, src, lay).save([KVRequest("r", [1], [3])])  # checksum off at the producer
    res = KVConsumer(buf, dst, lay, wait_s=0.1, verify=True).load([KVRequest("r", [1], [0])])
    assert not res["r"].ok and res["r"].cause == "integrity" and "no checksum" in res["r"].error


def test_hostile_producer_process_corruption_is_detected_across_processes(peers):
    every = 7
    prod = peers.start(K.corrupting_producer, 5, every)
    addr = peers.expect(prod, "addr", 60)
    cons = peers.start(K.verifying_consumer, 5, addr)
    out = peers.expect(cons, "ok", 120)
    want = {f"vllm_cpu-float32-{i}" for i in range(0, K.N_REQUESTS, every)}
    assert set(out["failed"]) == want and set(out["failed"].values()) == {"integrity"}
    assert out["loaded_nothing"]
    # exactly the corrupted requests differ from the producer (their blocks were never written)
    assert {b.split(":")[0] for b in out["bad"]} == want
    assert peers.expect(prod, "ok", 60)["done"]
