"""Tests for kv_transfer.tp_mapping: prefill/decode TP rank mapping and cache compatibility."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kv_transfer.errors import KVTransferError
from kv_transfer.tp_mapping import (
    HeadRead,
    KVCacheShape,
    ParallelMismatchError,
    check_tp_pair,
    compat_problem,
    decode_reads,
    kv_heads_per_rank,
    rank_heads,
    rank_port,
    readers_per_prefill_rank,
    source_ranks,
)

SIZES = (1, 2, 4, 8)
HEADS = (1, 2, 4, 8, 16)
ALL = list(itertools.product(SIZES, SIZES, HEADS))


def _vllm_rank_heads(h: int, tp: int, rank: int) -> list[int]:
    """vLLM's own rule (QKVParallelLinear.weight_loader), written independently of the module."""
    if tp >= h:
        replicas = tp // h
        return [rank // replicas]
    per = h // tp
    return list(range(rank * per, (rank + 1) * per))


@pytest.mark.parametrize("h", HEADS)
@pytest.mark.parametrize("tp", SIZES)
def test_rank_heads_follow_vllm_sharding(h: int, tp: int) -> None:
    for rank in range(tp):
        assert list(rank_heads(h, tp, rank)) == _vllm_rank_heads(h, tp, rank)
    held = sorted({x for r in range(tp) for x in rank_heads(h, tp, r)})
    assert held == list(range(h))  # every head lives somewhere
    assert kv_heads_per_rank(h, tp) == len(_vllm_rank_heads(h, tp, 0))


def _check_reads(p: int, d: int, h: int) -> None:
    for r in range(d):
        reads = decode_reads(p, d, h, r)
        want = list(rank_heads(h, d, r))
        got_dst: list[int] = []
        got_global: list[int] = []
        for rd in reads:
            assert isinstance(rd, HeadRead) and rd.num_heads >= 1
            src_shard = list(rank_heads(h, p, rd.prefill_rank))
            moved = src_shard[rd.src_head: rd.src_head + rd.num_heads]
            assert len(moved) == rd.num_heads, f"{rd} reads past prefill rank's shard {src_shard}"
            assert moved == want[rd.dst_head: rd.dst_head + rd.num_heads]  # right heads, right slot
            assert moved[0] == rd.global_head
            got_dst += range(rd.dst_head, rd.dst_head + rd.num_heads)
            got_global += moved
        assert sorted(got_dst) == list(range(len(want))), f"P={p} D={d} H={h} r={r}: {reads}"
        assert len(set(got_global)) == len(got_global)  # each head read once, never per replica
        assert [rd.dst_head for rd in reads] == sorted(rd.dst_head for rd in reads)


@pytest.mark.parametrize("p,d,h", ALL)
def test_every_decode_head_covered_exactly_once(p: int, d: int, h: int) -> None:
    _check_reads(p, d, h)


@given(st.sampled_from(SIZES), st.sampled_from(SIZES), st.sampled_from(HEADS + (32, 64)))
def test_coverage_hypothesis(p: int, d: int, h: int) -> None:
    _check_reads(p, d, h)


def test_named_cases() -> None:
    # homogeneous: rank r reads rank r, whole shard
    assert decode_reads(2, 2, 4, 1) == (HeadRead(1, 0, 0, 2, 2),)
    # D > P: a head slice of one prefill rank
    assert decode_reads(1, 2, 4, 1) == (HeadRead(0, 2, 0, 2, 2),)
    assert decode_reads(2, 4, 8, 3) == (HeadRead(1, 2, 0, 2, 6),)
    # P > D: both prefill shards, placed at their head offsets
    assert decode_reads(2, 1, 4, 0) == (HeadRead(0, 0, 0, 2, 0), HeadRead(1, 0, 2, 2, 2))
    # P > D with heads replicated on prefill: H=2, P=4: ranks 0,1 hold head 0; 2,3 head 1
    assert decode_reads(4, 1, 2, 0) == (HeadRead(0, 0, 0, 1, 0), HeadRead(2, 0, 1, 1, 1))
    # replicated on both sides: H=1 everywhere; decode rank 3 of 4 reads prefill rank 1 of 2
    assert decode_reads(2, 4, 1, 3) == (HeadRead(1, 0, 0, 1, 0),)
    # D > H > P: decode rank 3 of 4 holds head 1 = offset 1 of prefill rank 0's two heads
    assert decode_reads(1, 4, 2, 3) == (HeadRead(0, 1, 0, 1, 1),)


def test_readers_per_prefill_rank() -> None:
    assert readers_per_prefill_rank(2, 2, 4) == (1, 1)
    assert readers_per_prefill_rank(1, 2, 4) == (2,)
    assert readers_per_prefill_rank(2, 1, 4) == (1, 1)
    assert readers_per_prefill_rank(4, 1, 2) == (1, 0, 1, 0)  # replicas 1 and 3 are never read
    assert readers_per_prefill_rank(2, 8, 2) == (4, 4)


@pytest.mark.parametrize("p,d,h", ALL)
def test_readers_match_decode_reads(p: int, d: int, h: int) -> None:
    counts = readers_per_prefill_rank(p, d, h)
    assert len(counts) == p
    assert sum(counts) == sum(len(decode_reads(p, d, h, r)) for r in range(d))
    # every prefill head that exists is read by someone
    read_heads = {x for q in range(p) if counts[q] for x in rank_heads(h, p, q)}
    assert read_heads == set(range(h))


@pytest.mark.parametrize(
    "p,d,h,needle",
    [
        (2, 2, 3, "3 KV heads cannot be sharded over TP 2"),
        (4, 2, 6, "prefill (TP 4): 6 KV heads"),
        (1, 4, 6, "decode (TP 4): 6 KV heads"),
        (2, 3, 6, "prefill TP 2 and decode TP 3 are not multiples"),
        (0, 2, 4, "prefill TP size must be a positive int, got 0"),
        (2, True, 4, "decode TP size must be a positive int, got True"),
        (2, 2, -1, "total KV heads must be a positive int"),
    ],
)
def test_impossible_pairs_raise_naming_both_sides(p: int, d: int, h: int, needle: str) -> None:
    with pytest.raises(ParallelMismatchError) as ei:
        decode_reads(p, d, h, 0)
    assert needle in str(ei.value)
    assert isinstance(ei.value, KVTransferError) and isinstance(ei.value, ValueError)
    if p == 2 and d == 3:
        assert "6 KV heads" in str(ei.value)


def test_decode_rank_out_of_range() -> None:
    with pytest.raises(ParallelMismatchError, match=r"rank must be an int in \[0, 2\), got 2"):
        decode_reads(2, 2, 4, 2)
    with pytest.raises(ParallelMismatchError, match="got -1"):
        source_ranks(1, 2, 4, -1)
    check_tp_pair(8, 1, 16)  # fine


def _shape(**kw) -> KVCacheShape:
    base = dict(total_kv_heads=4, head_size=32, num_layers=2, dtype="torch.float32",
                block_size=32, layout="vllm_cpu", tp_size=1)
    base.update(kw)
    return KVCacheShape(**base)


def test_compat_equal_and_hetero_tp() -> None:
    assert compat_problem(_shape(), _shape()) is None
    assert compat_problem(_shape(tp_size=2), _shape(tp_size=1)) is None
    assert compat_problem(_shape(tp_size=1), _shape(tp_size=4)) is None


def test_compat_lists_every_mismatch() -> None:
    msg = compat_problem(_shape(), _shape(head_size=64, dtype="torch.bfloat16", layout="flash_attn"))
    assert msg == ("head_size: prefill=32 decode=64; dtype: prefill='torch.float32' "
                   "decode='torch.bfloat16'; layout: prefill='vllm_cpu' decode='flash_attn'")


def test_compat_tp_unpairable() -> None:
    msg = compat_problem(_shape(total_kv_heads=12, tp_size=4), _shape(total_kv_heads=12, tp_size=6))
    assert msg is not None and msg.startswith("tp_size: prefill=4 decode=6")
    assert "not multiples" in msg


def test_compat_heads_differ_reports_heads_not_tp() -> None:
    msg = compat_problem(_shape(total_kv_heads=8, tp_size=2), _shape(total_kv_heads=4, tp_size=2))
    assert msg == "total_kv_heads: prefill=8 decode=4"


def test_shape_round_trip_and_validation() -> None:
    s = _shape(tp_size=2)
    assert KVCacheShape.from_dict(s.to_dict()) == s
    with pytest.raises(ParallelMismatchError, match=r"missing keys \['tp_size'\]"):
        KVCacheShape.from_dict({k: v for k, v in s.to_dict().items() if k != "tp_size"})
    with pytest.raises(ParallelMismatchError, match=r"unknown keys \['pp_size'\]"):
        KVCacheShape.from_dict({**s.to_dict(), "pp_size": 1})
    with pytest.raises(ParallelMismatchError, match="3 KV heads cannot be sharded over TP 2"):
        _shape(total_kv_heads=3, tp_size=2)
    with pytest.raises(ParallelMismatchError, match="dtype must be a non-empty str"):
        _shape(dtype="")


def test_matches_vllm_nixl_mapping() -> None:
    """Same prefill ranks and head offsets as vLLM's NIXL connector for every combination."""
    nixl = pytest.importorskip("vllm.distributed.kv_transfer.kv_connector.v1.nixl.tp_mapping")
    from vllm.distributed.kv_transfer.kv_connector.utils import TransferTopology
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    for p, d, h in ALL:
        try:
            check_tp_pair(p, d, h)
        except ParallelMismatchError:
            continue
        for r in range(d):
            topo = TransferTopology(tp_rank=r, tp_size=d, block_size=32, engine_id="d", is_mla=False,
                                    is_mamba=False, total_num_kv_heads=h, attn_backends=[])
            m = nixl.compute_tp_mapping(topo, p, (FullAttentionSpec,))
            ours = decode_reads(p, d, h, r)
            assert tuple(rd.prefill_rank for rd in ours) == m.source_ranks_per_group[0], (p, d, h, r)
            if d > p:  # NIXL's offset counts slices of our size, or heads once they are replicated
                unit = 1 if h < d else ours[0].num_heads
                assert ours[0].src_head == m.rank_offset_factor * unit, (p, d, h, r)
            for rd in ours:  # NIXL's head slot = our destination offset in units of one source read
                assert m.rank_to_attention_slot[rd.prefill_rank] * rd.num_heads == rd.dst_head


def test_rank_ports_are_distinct_and_tp1_keeps_kv_port() -> None:
    assert rank_port(14579, 0, 1) == 14579
    ports = [rank_port(20000, t, 2, pp_rank=p, pp_size=2, dp_index=d)
             for d in range(3) for p in range(2) for t in range(2)]
    assert ports == list(range(20000, 20012))  # dense, one per worker, DP engines side by side
    with pytest.raises(ParallelMismatchError, match=r"tp_rank must be an int in \[0, 2\), got 2"):
        rank_port(20000, 2, 2)
    with pytest.raises(ParallelMismatchError, match="dp_index must be an int in >= 0, got -1"):
        rank_port(20000, 0, 2, dp_index=-1)
    with pytest.raises(ParallelMismatchError, match="KV port 65536 .* is not a valid TCP port"):
        rank_port(65535, 1, 2)
