"""Tests for head-sliced gather/scatter (kv_transfer.paged) driven by the TP mapping (kv_transfer.tp_mapping).

Every copy is checked bit for bit against an independent reference built by
plain indexing of a full-head cache, including round trips P=2 -> D=1 and
P=1 -> D=2 that rebuild the decode side's caches exactly.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from kv_transfer.paged import (
    PagedLayout,
    block_head_views,
    gather_block_heads,
    gather_blocks,
    head_dim_index,
    head_staging_shape,
    scatter_block_heads,
)
from kv_transfer.tp_mapping import decode_reads, rank_heads
from tests.test_paged import DEVICES, DTYPES, bits, make_caches, same_bits, seed_of

BS, HD, LAYERS = 4, 8, 3

# name -> (layout, shape builder taking (num_blocks, num_heads))
HEAD_LAYOUTS = {
    "vllm_cpu": (PagedLayout.vllm_cpu(), lambda nb, h: (nb, h, BS, 2 * HD)),
    "flash_attn": (PagedLayout.flash_attn(), lambda nb, h: (2, nb, BS, h, HD)),
    "flashinfer": (PagedLayout.flashinfer(), lambda nb, h: (nb, 2, BS, h, HD)),
}


def heads_of(cache: torch.Tensor, layout: PagedLayout, heads) -> torch.Tensor:
    """Reference: the cache restricted to global ``heads`` (a range), by plain slicing."""
    return cache.narrow(head_dim_index(layout), heads.start, len(heads))


def blocks_of(cache: torch.Tensor, layout: PagedLayout, ids) -> torch.Tensor:
    """Reference: blocks ``ids`` in id order, block dim moved first (like a staging slice)."""
    return cache.movedim(layout.block_dim, 0)[torch.as_tensor(np.asarray(ids), dtype=torch.long)]


def shard(caches, layout, heads) -> list[torch.Tensor]:
    """A TP rank's own caches: a *copy* of the full caches' heads ``heads`` (contiguous, like vLLM's)."""
    return [heads_of(c, layout, heads).contiguous() for c in caches]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(HEAD_LAYOUTS))
def test_gather_and_scatter_heads_bit_exact(name, dtype, device):
    layout, shape = HEAD_LAYOUTS[name]
    src = make_caches(shape(10, 4), dtype, device, seed_of(name, dtype, "src"), LAYERS)
    dst = make_caches(shape(7, 4), dtype, device, seed_of(name, dtype, "dst"), LAYERS)
    before = [c.clone() for c in dst]
    src_ids, dst_ids = [6, 2, 3, 9], [0, 5, 4, 1]
    staging = gather_block_heads(src, layout, src_ids, 1, 2)
    assert staging.shape == head_staging_shape(src, layout, 4, 2) and staging.is_contiguous()
    for layer in range(LAYERS):
        assert same_bits(staging[layer], blocks_of(heads_of(src[layer], layout, range(1, 3)), layout, src_ids))
    scatter_block_heads(dst, layout, dst_ids, staging, 2)  # heads 1..2 of src -> heads 2..3 of dst
    for layer in range(LAYERS):
        got, old = dst[layer], before[layer]
        assert same_bits(blocks_of(heads_of(got, layout, range(2, 4)), layout, dst_ids), staging[layer])
        assert same_bits(heads_of(got, layout, range(0, 2)), heads_of(old, layout, range(0, 2)))
        untouched = [b for b in range(7) if b not in dst_ids]
        assert same_bits(blocks_of(got, layout, untouched), blocks_of(old, layout, untouched))


def test_all_heads_equals_gather_blocks():
    layout, shape = HEAD_LAYOUTS["flash_attn"]
    caches = make_caches(shape(6, 2), torch.float32, "cpu", 7, LAYERS)
    assert same_bits(gather_block_heads(caches, layout, [5, 0], 0, 2), gather_blocks(caches, layout, [5, 0]))


def test_out_buffer_is_filled():
    layout, shape = HEAD_LAYOUTS["vllm_cpu"]
    caches = make_caches(shape(6, 4), torch.bfloat16, "cpu", 3, LAYERS)
    out = torch.empty(head_staging_shape(caches, layout, 2, 1), dtype=torch.bfloat16)
    assert gather_block_heads(caches, layout, [1, 4], 3, 1, out=out) is out
    assert same_bits(out[1], blocks_of(heads_of(caches[1], layout, range(3, 4)), layout, [1, 4]))


def _tp_round_trip(name: str, p: int, d: int, h: int, dtype=torch.float32) -> None:
    """Prefill TP p shards -> decode TP d shards through decode_reads; compare to the full cache."""
    layout, shape = HEAD_LAYOUTS[name]
    full = make_caches(shape(9, h), dtype, "cpu", seed_of(name, p, d, h), LAYERS)
    prefill = [shard(full, layout, rank_heads(h, p, q)) for q in range(p)]
    src_ids, dst_ids = [8, 1, 2, 3, 5], [4, 0, 6, 7, 2]
    for r in range(d):
        mine = rank_heads(h, d, r)
        noise = make_caches(shape(8, len(mine)), dtype, "cpu", seed_of("noise", r), LAYERS)
        before = [c.clone() for c in noise]
        for rd in decode_reads(p, d, h, r):
            staging = gather_block_heads(prefill[rd.prefill_rank], layout, src_ids, rd.src_head, rd.num_heads)
            scatter_block_heads(noise, layout, dst_ids, staging, rd.dst_head)
        for layer in range(LAYERS):
            want = blocks_of(heads_of(full[layer], layout, mine), layout, src_ids)
            assert same_bits(blocks_of(noise[layer], layout, dst_ids), want), (name, p, d, h, r, layer)
            rest = [b for b in range(8) if b not in dst_ids]
            assert same_bits(blocks_of(noise[layer], layout, rest), blocks_of(before[layer], layout, rest))


@pytest.mark.parametrize("name", sorted(HEAD_LAYOUTS))
def test_round_trip_p2_to_d1_rebuilds_full_heads(name):
    """Two prefill shards (heads 0-1, 2-3) scattered into one decode cache equal the full cache."""
    _tp_round_trip(name, 2, 1, 4)


@pytest.mark.parametrize("name", sorted(HEAD_LAYOUTS))
def test_round_trip_p1_to_d2_slices_heads(name):
    """One full prefill cache read by two decode ranks, each taking its own half of the heads."""
    _tp_round_trip(name, 1, 2, 4)


@pytest.mark.parametrize("p,d,h", [c for c in itertools.product((1, 2, 4), (1, 2, 4), (1, 2, 4, 8))])
def test_round_trip_all_tp_pairs(p, d, h):
    _tp_round_trip("vllm_cpu", p, d, h, torch.float16)
    _tp_round_trip("flash_attn", p, d, h, torch.float16)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_payloads_survive(device):
    layout, shape = HEAD_LAYOUTS["flash_attn"]
    caches = [torch.full(shape(3, 2), float("nan"), device=device)]
    bits(caches[0]).add_(torch.arange(bits(caches[0]).numel(), device=device).view(bits(caches[0]).shape) % 7)
    dst = [torch.zeros(shape(3, 2), device=device)]
    scatter_block_heads(dst, layout, [2], gather_block_heads(caches, layout, [0], 1, 1), 0)
    assert same_bits(heads_of(dst[0], layout, range(0, 1))[:, 2], heads_of(caches[0], layout, range(1, 2))[:, 0])


def test_bad_head_ranges_and_layouts():
    layout, shape = HEAD_LAYOUTS["vllm_cpu"]
    caches = make_caches(shape(4, 2), torch.float32, "cpu", 1, 1)
    with pytest.raises(ValueError, match=r"heads \[1, 3\) are not inside the cache's 2 KV heads"):
        gather_block_heads(caches, layout, [0], 1, 2)
    with pytest.raises(ValueError, match=r"heads \[-1, 0\)"):
        gather_block_heads(caches, layout, [0], -1, 1)
    with pytest.raises(ValueError, match=r"heads \[0, 0\)"):
        gather_block_heads(caches, layout, [0], 0, 0)
    with pytest.raises(TypeError, match="head_start must be an int, got True"):
        gather_block_heads(caches, layout, [0], True, 1)
    with pytest.raises(ValueError, match="layout 'blocks_first' has no 'head' dim"):
        gather_block_heads(caches, PagedLayout.blocks_first(), [0], 0, 1)
    staging = gather_block_heads(caches, layout, [0, 1], 0, 2)
    with pytest.raises(ValueError, match=r"heads \[1, 3\) are not inside"):
        scatter_block_heads(caches, layout, [2, 3], staging, 1)  # 2 heads do not fit from head 1
    with pytest.raises(ValueError, match="block id 2 appears 2 times"):
        scatter_block_heads(caches, layout, [2, 2], staging, 0)
    with pytest.raises(ValueError, match="does not match the expected shape"):
        scatter_block_heads(caches, layout, [2], staging, 0)  # 2 staged blocks for 1 id
    with pytest.raises(ValueError, match="has no head dim"):
        scatter_block_heads(caches, layout, [2], torch.zeros(1), 0)
    with pytest.raises(ValueError, match="scatter_block_heads staging: dtype torch.float16"):
        scatter_block_heads(caches, layout, [2, 3], staging.half(), 0)
    with pytest.raises(ValueError, match="gather_block_heads out: shape"):
        gather_block_heads(caches, layout, [0], 0, 1, out=torch.empty(1))


@pytest.mark.parametrize("device", DEVICES)
def test_block_head_views_vllm_cpu_zero_copy(device):
    layout, shape = HEAD_LAYOUTS["vllm_cpu"]
    src = make_caches(shape(6, 4), torch.float32, device, 11, LAYERS)
    dst = make_caches(shape(5, 2), torch.float32, device, 12, LAYERS)
    before = [c.clone() for c in dst]
    sv = block_head_views(src, layout, [4, 1, 2], 2, 2)  # heads 2..3 of a 4-head shard
    dv = block_head_views(dst, layout, [0, 3, 1], 0, 2)  # into a 2-head shard (P=1 -> D=2, rank 1)
    assert len(sv) == len(dv) == LAYERS * 3
    for a, b in zip(sv, dv):
        assert a.is_contiguous() and b.is_contiguous() and a.shape == b.shape == (2, BS, 2 * HD)
        b.copy_(a)
    for layer in range(LAYERS):
        assert sv[layer * 3].data_ptr() == src[layer][4, 2].data_ptr()  # a view, not a copy
        assert same_bits(blocks_of(dst[layer], layout, [0, 3, 1]),
                         blocks_of(heads_of(src[layer], layout, range(2, 4)), layout, [4, 1, 2]))
        assert same_bits(blocks_of(dst[layer], layout, [2, 4]), blocks_of(before[layer], layout, [2, 4]))


def test_block_head_views_refuses_strided_layouts():
    layout, shape = HEAD_LAYOUTS["flash_attn"]
    caches = make_caches(shape(3, 4), torch.float32, "cpu", 1, 1)
    with pytest.raises(ValueError, match=r"heads \[1, 2\) of block 0 are not contiguous in layout 'flash_attn'"):
        block_head_views(caches, layout, [0], 1, 1)
    assert len(block_head_views(caches, layout, [0, 2], 0, 4)) == 4  # all heads: contiguous, K and V per block
    with pytest.raises(ValueError, match="head dim before the block dim"):
        block_head_views([torch.zeros(2, 3, 4)], PagedLayout("hb", 1, ("head", "block", "x")), [0], 0, 1)
