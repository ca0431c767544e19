"""Tests for kv_transfer.paged: gather/scatter and zero-copy views of paged KV caches."""

from __future__ import annotations

import dataclasses
import json
import zlib

import numpy as np
import pytest
import torch

from kv_transfer.paged import (
    PagedLayout,
    block_views,
    coalesce_runs,
    gather_blocks,
    matching_views,
    scatter_blocks,
    staging_shape,
)

NUM_LAYERS = 3
NB_SRC = 12  # blocks in the source cache
NB_DST = 16  # blocks in the destination cache (different on purpose)
BS, H, D = 4, 2, 8

# name -> (layout, shape builder taking num_blocks)
LAYOUTS = {
    "flash_attn": (PagedLayout.flash_attn(), lambda nb: (2, nb, BS, H, D)),
    "vllm_cpu": (PagedLayout.vllm_cpu(), lambda nb: (nb, H, BS, 2 * D)),
    "flashinfer": (PagedLayout.flashinfer(), lambda nb: (nb, 2, BS, H, D)),
    "blocks_first": (PagedLayout.blocks_first(), lambda nb: (nb, BS, H, D)),
    # Generic case: two leading dims before the block dim.
    "block_dim2": (PagedLayout("kv_head_major", 2), lambda nb: (2, H, nb, BS, D)),
}

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8]
if hasattr(torch, "float8_e4m3fn"):
    DTYPES.append(torch.float8_e4m3fn)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",  # selected by `pytest -m gpu` (make gpu-check)
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")],
    ),
]

ID_CASES = ["one", "all", "random", "runs"]

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """Same-width integer view, for bit-exact comparison (NaNs included)."""
    return t.view(_INT_OF_SIZE[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a).cpu(), bits(b).cpu())


def seed_of(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def make_caches(shape, dtype, device, seed, layers=NUM_LAYERS):
    """Per-layer caches filled with random bit patterns (any value incl. NaN/Inf)."""
    g = torch.Generator().manual_seed(seed)
    item = torch.empty((), dtype=dtype).element_size()
    out = []
    for _ in range(layers):
        raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * item), dtype=torch.uint8, generator=g)
        out.append(raw.view(dtype).to(device))
    return out


def make_ids(case: str, rng: np.random.Generator):
    """Source ids (into NB_SRC blocks) and destination ids (into NB_DST blocks)."""
    if case == "one":
        n = 1
    elif case == "all":
        n = NB_SRC
    elif case == "random":
        n = int(rng.integers(2, NB_SRC))
    else:  # "runs": hand-made, with different run structures on both sides
        return [3, 4, 5, 9, 0, 1], [7, 8, 0, 1, 2, 15]
    src = rng.choice(NB_SRC, n, replace=False)
    dst = rng.choice(NB_DST, n, replace=False)
    if case == "random":  # sorted sets create runs of consecutive ids
        src, dst = np.sort(src), np.sort(dst)
    return src, dst


def as_id_input(ids, case: str, device: str):
    """Exercise the accepted id container types."""
    ids = np.asarray(ids)
    if case == "one":
        return ids.tolist()
    if case == "all":
        return ids.astype(np.int32)
    if case == "random":
        return torch.as_tensor(ids, device=device)
    return tuple(int(i) for i in ids)


def block_of(cache: torch.Tensor, layout: PagedLayout, i: int) -> torch.Tensor:
    return cache.select(layout.block_dim, int(i))


def check_transfer(src, dst_before, dst_after, layout, src_ids, dst_ids):
    """dst blocks dst_ids == src blocks src_ids; every other dst block untouched."""
    nb_dst = layout.num_blocks(dst_after[0])
    written = set(int(i) for i in dst_ids)
    for layer in range(len(src)):
        for s, d in zip(src_ids, dst_ids):
            assert same_bits(
                block_of(dst_after[layer], layout, d), block_of(src[layer], layout, s)
            ), f"layer {layer}: dst block {d} != src block {s}"
        for b in range(nb_dst):
            if b not in written:
                assert same_bits(
                    block_of(dst_after[layer], layout, b), block_of(dst_before[layer], layout, b)
                ), f"layer {layer}: untouched block {b} changed"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("case", ID_CASES)
def test_gather_scatter_roundtrip(layout_name, dtype, device, case):
    layout, shape_of = LAYOUTS[layout_name]
    seed = seed_of(layout_name, dtype, case, "staging")
    src = make_caches(shape_of(NB_SRC), dtype, device, seed)
    dst = make_caches(shape_of(NB_DST), dtype, device, seed + 1)
    dst_before = [c.clone() for c in dst]
    src_ids, dst_ids = make_ids(case, np.random.default_rng(seed))

    staging = gather_blocks(src, layout, as_id_input(src_ids, case, device))
    per_block = layout.per_block_shape(src[0])
    assert staging.shape == (NUM_LAYERS, len(src_ids), *per_block)
    assert staging.shape == staging_shape(src, layout, len(src_ids))
    assert staging.is_contiguous() and staging.dtype == dtype
    assert staging.device.type == torch.device(device).type
    for layer in range(NUM_LAYERS):
        for i, s in enumerate(src_ids):
            assert same_bits(staging[layer, i], block_of(src[layer], layout, s))

    src_copy = [c.clone() for c in src]
    scatter_blocks(dst, layout, as_id_input(dst_ids, case, device), staging)
    check_transfer(src, dst_before, dst, layout, src_ids, dst_ids)
    for a, b in zip(src, src_copy):  # the source is only read
        assert same_bits(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("case", ID_CASES)
def test_matching_views_copy(layout_name, dtype, device, case):
    layout, shape_of = LAYOUTS[layout_name]
    seed = seed_of(layout_name, dtype, case, "views")
    src = make_caches(shape_of(NB_SRC), dtype, device, seed)
    dst = make_caches(shape_of(NB_DST), dtype, device, seed + 1)
    dst_before = [c.clone() for c in dst]
    src_ids, dst_ids = make_ids(case, np.random.default_rng(seed))

    src_views, dst_views = matching_views(
        src, as_id_input(src_ids, case, device), dst, as_id_input(dst_ids, case, device), layout
    )
    assert len(src_views) == len(dst_views) > 0
    storages_src = {c.untyped_storage().data_ptr() for c in src}
    storages_dst = {c.untyped_storage().data_ptr() for c in dst}
    for sv, dv in zip(src_views, dst_views):
        assert sv.shape == dv.shape
        assert sv.is_contiguous() and dv.is_contiguous()
        assert sv.untyped_storage().data_ptr() in storages_src  # zero-copy
        assert dv.untyped_storage().data_ptr() in storages_dst
        dv.copy_(sv)
    check_transfer(src, dst_before, dst, layout, src_ids, dst_ids)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_flash_attn_cuda_model_shape_to_host_and_back():
    """Llama-3-8B-like flash-attn caches on CUDA: gather, stage on the host, scatter into CUDA."""
    layout = PagedLayout.flash_attn()
    shape = (2, 256, 16, 8, 128)  # (2, num_blocks, block_size, num_kv_heads, head_size)
    src = make_caches(shape, torch.bfloat16, "cuda", 11, layers=4)
    dst = make_caches(shape, torch.bfloat16, "cuda", 12, layers=4)
    before = [c.clone() for c in dst]
    rng = np.random.default_rng(5)
    src_ids = rng.choice(256, 100, replace=False)
    dst_ids = np.sort(rng.choice(256, 100, replace=False))  # runs on one side only
    staging = gather_blocks(src, layout, torch.as_tensor(src_ids, device="cuda"))
    assert staging.is_cuda and staging.shape == (4, 100, 2, 16, 8, 128)
    on_host = staging.cpu()  # what a transport would send when the peer stages in host memory
    scatter_blocks(dst, layout, dst_ids, on_host.to("cuda"))
    check_transfer(src, before, dst, layout, src_ids, dst_ids)


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_block_views_runs_and_contents(layout_name):
    layout, shape_of = LAYOUTS[layout_name]
    caches = make_caches(shape_of(NB_SRC), torch.float16, "cpu", seed_of(layout_name, "bv"))
    ids = [3, 4, 5, 9]
    views = block_views(caches, layout, ids)
    leading = int(np.prod(shape_of(NB_SRC)[: layout.block_dim]))  # 1, 2 (K/V) or 2*H
    assert len(views) == NUM_LAYERS * 2 * leading  # 2 runs
    assert all(v.is_contiguous() for v in views)
    total = sum(v.numel() * v.element_size() for v in views)
    assert total == NUM_LAYERS * len(ids) * layout.block_nbytes(caches[0])

    # Views are in (layer, run, leading index) order and alias the cache.
    k = 0
    for layer in range(NUM_LAYERS):
        for start, n in [(3, 3), (9, 1)]:
            for lead in np.ndindex(*shape_of(NB_SRC)[: layout.block_dim]):
                ref = caches[layer][lead].narrow(0, start, n)
                assert same_bits(views[k], ref)
                k += 1
    views[0].fill_(0)  # writes through to the cache
    first_lead = (0,) * layout.block_dim
    assert torch.count_nonzero(bits(caches[0][first_lead].narrow(0, 3, 3))) == 0

    assert block_views(caches, layout, []) == []


def test_block_views_same_run_structure_match():
    layout, shape_of = LAYOUTS["flash_attn"]
    src = make_caches(shape_of(NB_SRC), torch.float32, "cpu", 1)
    dst = make_caches(shape_of(NB_DST), torch.float32, "cpu", 2)
    before = [c.clone() for c in dst]
    s_ids, d_ids = [0, 1, 2, 7, 8], [10, 11, 12, 3, 4]  # same run lengths (3, 2)
    sv, dv = block_views(src, layout, s_ids), block_views(dst, layout, d_ids)
    assert [v.shape for v in sv] == [v.shape for v in dv]
    for a, b in zip(sv, dv):
        b.copy_(a)
    check_transfer(src, before, dst, layout, s_ids, d_ids)


def test_coalesce_runs():
    assert coalesce_runs([3, 4, 5, 9]) == [(3, 3), (9, 1)]
    assert coalesce_runs([]) == []
    assert coalesce_runs([7]) == [(7, 1)]
    assert coalesce_runs([5, 4]) == [(5, 1), (4, 1)]  # never reordered
    assert coalesce_runs([2, 2, 3]) == [(2, 1), (2, 2)]
    assert coalesce_runs(np.array([0, 1, 2], dtype=np.uint16)) == [(0, 3)]
    assert coalesce_runs(torch.tensor([10, 11, 0, 1])) == [(10, 2), (0, 2)]
    assert coalesce_runs(range(4)) == [(0, 4)]
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(1000, 300, replace=False))
    runs = coalesce_runs(ids)
    assert np.concatenate([np.arange(s, s + n) for s, n in runs]).tolist() == ids.tolist()
    assert all(runs[i][0] + runs[i][1] != runs[i + 1][0] for i in range(len(runs) - 1))
    with pytest.raises(TypeError):
        coalesce_runs([1.5, 2.5])


def test_gather_out_reused_and_validated():
    layout, shape_of = LAYOUTS["flash_attn"]
    caches = make_caches(shape_of(NB_SRC), torch.bfloat16, "cpu", 3)
    out = torch.empty(staging_shape(caches, layout, 3), dtype=torch.bfloat16)
    res = gather_blocks(caches, layout, [1, 5, 5], out=out)  # repeats allowed in gather
    assert res is out
    assert same_bits(out[2, 1], block_of(caches[2], layout, 5))
    with pytest.raises(ValueError, match="shape"):
        gather_blocks(caches, layout, [1, 5], out=out)
    with pytest.raises(ValueError, match="dtype"):
        gather_blocks(caches, layout, [1, 5, 6], out=out.float())
    non_contig = torch.empty((*out.shape, 2), dtype=torch.bfloat16)[..., 0]
    with pytest.raises(ValueError, match="contiguous"):
        gather_blocks(caches, layout, [1, 5, 6], out=non_contig)
    empty = gather_blocks(caches, layout, [])
    assert empty.shape == (NUM_LAYERS, 0, 2, BS, H, D)
    scatter_blocks(caches, layout, [], empty)  # no-op


@pytest.mark.parametrize("layout_name", ["flash_attn", "vllm_cpu"])
def test_out_of_range_ids(layout_name):
    layout, shape_of = LAYOUTS[layout_name]
    caches = make_caches(shape_of(NB_SRC), torch.float32, "cpu", 4)
    staging = gather_blocks(caches, layout, [0, 1])
    for bad in ([0, NB_SRC], [-1, 2], np.array([NB_SRC + 5, 0]), torch.tensor([0, 99])):
        bad_id = int(np.asarray(bad)[np.argmax((np.asarray(bad) < 0) | (np.asarray(bad) >= NB_SRC))])
        with pytest.raises(ValueError, match=rf"block id {bad_id}\b.*out of range"):
            gather_blocks(caches, layout, bad)
        with pytest.raises(ValueError, match=rf"block id {bad_id}\b"):
            scatter_blocks(caches, layout, bad, staging)
        with pytest.raises(ValueError, match=rf"block id {bad_id}\b"):
            block_views(caches, layout, bad)
        with pytest.raises(ValueError, match=rf"block id {bad_id}\b"):
            matching_views(caches, [0, 1], caches, bad, layout)


def test_bad_ids_shape_and_type():
    layout, shape_of = LAYOUTS["blocks_first"]
    caches = make_caches(shape_of(NB_SRC), torch.float32, "cpu", 5)
    with pytest.raises(ValueError, match="1-D"):
        gather_blocks(caches, layout, [[0, 1]])
    with pytest.raises(TypeError):
        gather_blocks(caches, layout, [0.0, 1.0])
    with pytest.raises(TypeError):
        gather_blocks(caches, layout, torch.tensor([0.0]))
    staging = gather_blocks(caches, layout, [0, 1])
    with pytest.raises(ValueError, match="block id 3 appears 2 times"):
        scatter_blocks(caches, layout, [3, 3], staging)
    with pytest.raises(ValueError, match="appears"):
        matching_views(caches, [0, 1], caches, [4, 4], layout)


def test_cache_list_validation():
    layout, shape_of = LAYOUTS["flash_attn"]
    caches = make_caches(shape_of(NB_SRC), torch.float16, "cpu", 6)
    with pytest.raises(ValueError, match="layer 2: dtype"):
        gather_blocks([caches[0], caches[1], caches[2].float()], layout, [0])
    with pytest.raises(ValueError, match="layer 1: shape"):
        gather_blocks([caches[0], caches[1][:, :5]], layout, [0])
    with pytest.raises(ValueError, match="expects 5 dims"):
        gather_blocks([caches[0][0]], layout, [0])  # K only: wrong rank for flash_attn
    with pytest.raises(TypeError, match="single tensor"):
        gather_blocks(caches[0], layout, [0])
    with pytest.raises(ValueError, match="empty"):
        gather_blocks([], layout, [0])


def test_scatter_staging_validation():
    layout, shape_of = LAYOUTS["vllm_cpu"]
    caches = make_caches(shape_of(NB_SRC), torch.float16, "cpu", 7)
    staging = gather_blocks(caches, layout, [0, 1, 2])
    with pytest.raises(ValueError) as exc:
        scatter_blocks(caches, layout, [4, 5], staging)
    msg = str(exc.value)
    assert str(tuple(staging.shape)) in msg and str((NUM_LAYERS, 2, H, BS, 2 * D)) in msg
    with pytest.raises(ValueError, match="shape"):
        scatter_blocks(caches[:2], layout, [4, 5, 6], staging)
    with pytest.raises(ValueError, match="dtype"):
        scatter_blocks(caches, layout, [4, 5, 6], staging.float())


def test_matching_views_validation():
    layout, shape_of = LAYOUTS["flash_attn"]
    src = make_caches(shape_of(NB_SRC), torch.float16, "cpu", 8)
    with pytest.raises(ValueError, match="source ids"):
        matching_views(src, [0, 1], src, [2], layout)
    with pytest.raises(ValueError, match="dtype"):
        matching_views(src, [0], [c.float() for c in src], [0], layout)
    with pytest.raises(ValueError, match="layers"):
        matching_views(src, [0], src[:2], [0], layout)
    other = make_caches((2, NB_SRC, BS, H, D + 1), torch.float16, "cpu", 9)
    with pytest.raises(ValueError, match="per-block shapes"):
        matching_views(src, [0], other, [0], layout)
    assert matching_views(src, [], src, [], layout) == ([], [])


def test_non_contiguous_cache_views_rejected_but_staging_works():
    layout = PagedLayout.blocks_first()
    # Block dim is not the outermost in memory: block slices are strided.
    caches = [torch.randn(BS, NB_SRC, H, D).transpose(0, 1) for _ in range(2)]
    with pytest.raises(ValueError, match="not contiguous"):
        block_views(caches, layout, [1, 2])
    dst = [torch.zeros(NB_SRC, BS, H, D) for _ in range(2)]
    scatter_blocks(dst, layout, [5, 6], gather_blocks(caches, layout, [1, 2]))
    assert torch.equal(dst[1][5:7], caches[1][1:3])


def test_layout_presets_and_serialisation():
    assert PagedLayout.flash_attn().block_dim == 1
    assert PagedLayout.vllm_cpu().block_dim == 0
    assert PagedLayout.blocks_first().block_dim == 0
    assert PagedLayout.flashinfer().block_dim == 0
    for layout, _ in LAYOUTS.values():
        d = json.loads(json.dumps(layout.to_dict()))
        assert PagedLayout.from_dict(d) == layout
    assert PagedLayout.flash_attn() != PagedLayout.blocks_first()
    with pytest.raises(ValueError, match="unknown keys"):
        PagedLayout.from_dict({"block_dim": 0, "stride_order": [0, 1]})
    with pytest.raises(ValueError, match="block_dim"):
        PagedLayout.from_dict({"name": "x"})
    with pytest.raises(ValueError):
        PagedLayout("bad", -1)
    with pytest.raises(ValueError):
        PagedLayout("bad", 3, ("block", "token"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        PagedLayout.flash_attn().block_dim = 0  # type: ignore[misc]


def test_layout_sizes():
    fa = PagedLayout.flash_attn()
    t = torch.empty(2, NB_SRC, BS, H, D, dtype=torch.bfloat16)
    assert fa.num_blocks(t) == NB_SRC
    assert fa.per_block_shape(t) == (2, BS, H, D)
    assert fa.block_nbytes(t) == 2 * BS * H * D * 2
    cpu = PagedLayout.vllm_cpu()
    t = torch.empty(NB_SRC, H, BS, 2 * D, dtype=torch.float32)
    assert cpu.num_blocks(t) == NB_SRC
    assert cpu.block_nbytes(t) == H * BS * 2 * D * 4
    with pytest.raises(ValueError):
        fa.num_blocks(torch.empty(NB_SRC, BS))
