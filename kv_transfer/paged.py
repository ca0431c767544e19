"""Moving one request's blocks between paged KV caches (layout description, gather/scatter, block views).

Why one file of ~830 lines: the layout, its id and shape checks and both ways of
moving blocks share every private helper; about a third of it is docstrings.

Inference engines keep the KV cache as *paged* tensors: one tensor per layer,
with one dimension indexing fixed-size blocks of tokens. Engines disagree on
where that dimension sits, for example::

    FlashAttention (GPU)  (2, num_blocks, block_size, kv_heads, head_dim)
    vLLM CPU              (num_blocks, kv_heads, block_size, 2 * head_dim)
    FlashInfer-like       (num_blocks, 2, block_size, kv_heads, head_dim)
    single K or V cache   (num_blocks, block_size, kv_heads, head_dim)

:class:`PagedLayout` describes such a tensor (chiefly which dim indexes
blocks) instead of assuming one. On top of it this module offers two ways of
moving a request's blocks, given by block ids, out of one set of per-layer
caches and into *other* block ids of another set:

* Staging: :func:`gather_blocks` copies the blocks of every layer into one
  contiguous tensor of canonical shape ``(num_layers, num_ids,
  *per_block_shape)``; :func:`scatter_blocks` writes such a tensor back into
  any block ids. Each is one vectorised indexing op per layer.
* Zero copy: :func:`block_views` returns contiguous views of the caches, one
  per layer, run of consecutive ids (see :func:`coalesce_runs`), and slice of
  the dims before the block dim, so a transport can send from or receive into
  the cache memory directly. :func:`matching_views` pairs source and
  destination views of equal shape when the two sides' id lists have
  different run structures.
* Head-sliced staging, for tensor-parallel ranks that hold different KV-head
  shards (see :mod:`kv_transfer.tp_mapping`): :func:`gather_block_heads` and
  :func:`scatter_block_heads` are the staging pair restricted to a range of
  KV heads, for any layout whose ``dims`` name its ``"head"`` dim; and
  :func:`block_head_views`, zero-copy per-block views of a head range where
  a head range of a block is contiguous (``vllm_cpu``).

Data is moved as raw bits: every copy reinterprets the tensors as an integer
dtype of the same width, so the result is bit-exact for any dtype (NaN
payloads, float8, ...) and no dtype needs kernel support for indexing. Nothing
here is CPU-specific; CPU and CUDA tensors are handled alike.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "PagedLayout",
    "BlockIds",
    "staging_shape",
    "gather_blocks",
    "scatter_blocks",
    "coalesce_runs",
    "block_views",
    "matching_views",
    "head_dim_index",
    "head_staging_shape",
    "gather_block_heads",
    "scatter_block_heads",
    "block_head_views",
]

logger = logging.getLogger(__name__)

#: Anything accepted as a list of block ids: a 1-D sequence of ints, a 1-D
#: integer numpy array, or a 1-D integer torch tensor (any device).
BlockIds = Union[Sequence[int], np.ndarray, torch.Tensor]

# Same-width integer dtypes used to move data as raw bits.
_BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# --------------------------------------------------------------------------- #
# Layout description
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class PagedLayout:
    """Description of one layer's paged KV-cache tensor.

    Attributes:
        name: Free-form label (e.g. ``"flash_attn"``); it is compared by
            ``==`` like every other field but has no effect on the operations.
        block_dim: Which dimension of the per-layer tensor indexes blocks.
        dims: Optional names of all dimensions, e.g. ``("kv", "block",
            "token", "head", "head_dim")``. When non-empty, tensors are
            required to have exactly ``len(dims)`` dimensions and
            ``dims[block_dim]`` should be ``"block"``. Empty means "any rank
            greater than ``block_dim``".

    Layouts are immutable and serialisable with :meth:`to_dict` /
    :meth:`from_dict`, so two peers can compare them in a handshake.
    """

    name: str
    block_dim: int
    dims: Tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"PagedLayout.name must be a non-empty str, got {self.name!r}")
        if isinstance(self.block_dim, bool) or not isinstance(self.block_dim, int):
            raise ValueError(f"PagedLayout.block_dim must be an int, got {self.block_dim!r}")
        if self.block_dim < 0:
            raise ValueError(f"PagedLayout.block_dim must be >= 0, got {self.block_dim}")
        dims = tuple(self.dims)
        if not all(isinstance(d, str) for d in dims):
            raise ValueError(f"PagedLayout.dims must be strings, got {self.dims!r}")
        if dims and self.block_dim >= len(dims):
            raise ValueError(
                f"PagedLayout.block_dim={self.block_dim} is outside dims {dims!r}"
            )
        object.__setattr__(self, "dims", dims)

    # -- presets ------------------------------------------------------------ #

    @classmethod
    def flash_attn(cls) -> "PagedLayout":
        """GPU FlashAttention: ``(2, num_blocks, block_size, kv_heads, head_dim)``."""
        return cls("flash_attn", 1, ("kv", "block", "token", "head", "head_dim"))

    @classmethod
    def vllm_cpu(cls) -> "PagedLayout":
        """vLLM CPU: ``(num_blocks, kv_heads, block_size, 2 * head_dim)``, K|V packed last."""
        return cls("vllm_cpu", 0, ("block", "head", "token", "kv_head_dim"))

    @classmethod
    def flashinfer(cls) -> "PagedLayout":
        """FlashInfer-like: ``(num_blocks, 2, block_size, kv_heads, head_dim)``."""
        return cls("flashinfer", 0, ("block", "kv", "token", "head", "head_dim"))

    @classmethod
    def blocks_first(cls) -> "PagedLayout":
        """Any rank with blocks in dim 0, e.g. ``(num_blocks, block_size, kv_heads, head_dim)``."""
        return cls("blocks_first", 0)

    # -- serialisation ------------------------------------------------------ #

    def to_dict(self) -> dict:
        """Return a small JSON-compatible dict; ``from_dict(to_dict())`` round-trips."""
        return {"name": self.name, "block_dim": self.block_dim, "dims": list(self.dims)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PagedLayout":
        """Build a layout from :meth:`to_dict` output.

        Raises:
            ValueError: on a missing ``block_dim``, on unknown keys (a field
                this version does not understand could mean a different
                memory layout, so it is not silently ignored), or on invalid
                values.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"PagedLayout.from_dict expects a mapping, got {type(data).__name__}")
        unknown = set(data) - {"name", "block_dim", "dims"}
        if unknown:
            raise ValueError(f"PagedLayout.from_dict: unknown keys {sorted(unknown)}")
        if "block_dim" not in data:
            raise ValueError("PagedLayout.from_dict: missing 'block_dim'")
        return cls(
            name=data.get("name", "custom"),
            block_dim=data["block_dim"],
            dims=tuple(data.get("dims", ())),
        )

    # -- per-tensor queries ------------------------------------------------- #

    def check_tensor(self, tensor: torch.Tensor, what: str = "tensor") -> None:
        """Raise ``ValueError`` unless ``tensor``'s rank fits this layout."""
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{what}: expected a torch.Tensor, got {type(tensor).__name__}")
        if self.dims and tensor.dim() != len(self.dims):
            raise ValueError(
                f"{what}: layout {self.name!r} expects {len(self.dims)} dims "
                f"{self.dims}, got shape {tuple(tensor.shape)}"
            )
        if tensor.dim() <= self.block_dim:
            raise ValueError(
                f"{what}: layout {self.name!r} has block_dim={self.block_dim}, "
                f"got shape {tuple(tensor.shape)}"
            )

    def num_blocks(self, tensor: torch.Tensor) -> int:
        """Number of blocks in ``tensor`` (its size along :attr:`block_dim`)."""
        self.check_tensor(tensor)
        return int(tensor.shape[self.block_dim])

    def per_block_shape(self, tensor: torch.Tensor) -> Tuple[int, ...]:
        """``tensor``'s shape with the block dim removed, other dims in order."""
        self.check_tensor(tensor)
        shape = tuple(tensor.shape)
        return shape[: self.block_dim] + shape[self.block_dim + 1 :]

    def block_nbytes(self, tensor: torch.Tensor) -> int:
        """Bytes of one block's data in this layer (all K/V halves included)."""
        return math.prod(self.per_block_shape(tensor)) * tensor.element_size()


# --------------------------------------------------------------------------- #
# Internal helpers
# --------------------------------------------------------------------------- #


def _bits(t: torch.Tensor) -> torch.Tensor:
    """View ``t`` as a same-width integer dtype (same shape, strides, storage)."""
    bits_dtype = _BITS_DTYPE.get(t.element_size())
    if bits_dtype is None or t.dtype == bits_dtype:
        return t
    return t.view(bits_dtype)


def _check_caches(
    caches: Sequence[torch.Tensor], layout: PagedLayout, what: str = "caches"
) -> Tuple[torch.Size, torch.dtype, torch.device]:
    """Validate a per-layer cache list; return its common (shape, dtype, device)."""
    if not isinstance(layout, PagedLayout):
        raise TypeError(f"layout must be a PagedLayout, got {type(layout).__name__}")
    if isinstance(caches, torch.Tensor):
        raise TypeError(
            f"{what}: expected a sequence of per-layer tensors, got a single tensor "
            f"of shape {tuple(caches.shape)} (wrap it as [t], or use list(t) for a "
            f"stacked all-layer tensor)"
        )
    caches = list(caches)
    if not caches:
        raise ValueError(f"{what}: empty list of layer caches")
    first = caches[0]
    layout.check_tensor(first, f"{what} layer 0")
    for i, c in enumerate(caches[1:], start=1):
        layout.check_tensor(c, f"{what} layer {i}")
        if c.dtype != first.dtype:
            raise ValueError(f"{what} layer {i}: dtype {c.dtype} != layer 0 dtype {first.dtype}")
        if c.device != first.device:
            raise ValueError(f"{what} layer {i}: device {c.device} != layer 0 device {first.device}")
        if c.shape != first.shape:
            raise ValueError(
                f"{what} layer {i}: shape {tuple(c.shape)} != layer 0 shape {tuple(first.shape)}"
            )
    return first.shape, first.dtype, first.device


def _staging_of(shape: torch.Size, layout: PagedLayout, num_layers: int, num_ids: int) -> torch.Size:
    """Canonical staging shape ``(num_layers, num_ids, *shape without the block dim)``."""
    bd = layout.block_dim
    return torch.Size((num_layers, int(num_ids)) + tuple(shape[:bd]) + tuple(shape[bd + 1 :]))


def _ids_numpy(block_ids: BlockIds, what: str = "block_ids") -> np.ndarray:
    """Block ids as a 1-D int64 numpy array on the host (syncs for CUDA tensors)."""
    if isinstance(block_ids, torch.Tensor):
        if block_ids.is_floating_point() or block_ids.is_complex() or block_ids.dtype == torch.bool:
            raise TypeError(f"{what}: expected integer ids, got tensor of dtype {block_ids.dtype}")
        arr = block_ids.detach().to("cpu", torch.int64).numpy()
    else:
        arr = np.asarray(block_ids)
        if arr.size == 0:
            arr = arr.astype(np.int64)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{what}: expected integer ids, got dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D list of ids, got shape {arr.shape}")
    return arr


def _check_range_numpy(ids: np.ndarray, num_blocks: int, what: str) -> None:
    bad = np.flatnonzero((ids < 0) | (ids >= num_blocks))
    if bad.size:
        pos = int(bad[0])
        raise ValueError(
            f"{what}: block id {int(ids[pos])} at position {pos} is out of range "
            f"[0, {num_blocks}) ({bad.size} bad id(s) in total)"
        )


def _check_unique_numpy(ids: np.ndarray, what: str) -> None:
    if ids.size > 1:
        uniq, counts = np.unique(ids, return_counts=True)
        dup = np.flatnonzero(counts > 1)
        if dup.size:
            raise ValueError(
                f"{what}: block id {int(uniq[dup[0]])} appears {int(counts[dup[0]])} times; "
                f"destination ids must be distinct"
            )


def _ids_tensor(
    block_ids: BlockIds,
    num_blocks: int,
    device: torch.device,
    what: str,
    unique: bool = False,
) -> torch.Tensor:
    """Validate ids and return them as a 1-D int64 tensor on ``device``.

    Host-side ids (lists, numpy) are checked on the host; a device tensor is
    checked on the device (a single host sync for the result).
    """
    if isinstance(block_ids, torch.Tensor) and block_ids.device.type != "cpu":
        if block_ids.is_floating_point() or block_ids.is_complex() or block_ids.dtype == torch.bool:
            raise TypeError(f"{what}: expected integer ids, got tensor of dtype {block_ids.dtype}")
        if block_ids.dim() != 1:
            raise ValueError(f"{what}: expected a 1-D list of ids, got shape {tuple(block_ids.shape)}")
        t = block_ids.to(device=device, dtype=torch.int64)
        bad = (t < 0) | (t >= num_blocks)
        if unique and t.numel() > 1:
            sorted_t = torch.sort(t).values
            has_dup = (sorted_t[1:] == sorted_t[:-1]).any()
            if bool(bad.any()) or bool(has_dup):
                # Slow path only to build the error message.
                arr = _ids_numpy(t, what)
                _check_range_numpy(arr, num_blocks, what)
                _check_unique_numpy(arr, what)
        elif bool(bad.any()):
            _check_range_numpy(_ids_numpy(t, what), num_blocks, what)
        return t
    arr = _ids_numpy(block_ids, what)
    _check_range_numpy(arr, num_blocks, what)
    if unique:
        _check_unique_numpy(arr, what)
    return torch.from_numpy(np.ascontiguousarray(arr)).to(device)


# --------------------------------------------------------------------------- #
# Staging path
# --------------------------------------------------------------------------- #


def staging_shape(
    caches: Sequence[torch.Tensor], layout: PagedLayout, num_ids: int
) -> torch.Size:
    """Canonical staging shape ``(num_layers, num_ids, *per_block_shape)`` for ``caches``.

    Use it to preallocate an ``out=`` tensor for :func:`gather_blocks` (e.g.
    pinned host memory) with the caches' dtype.
    """
    shape, _, _ = _check_caches(caches, layout)
    return _staging_of(shape, layout, len(caches), num_ids)


def gather_blocks(
    caches: Sequence[torch.Tensor],
    layout: PagedLayout,
    block_ids: BlockIds,
    *,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Copy the blocks ``block_ids`` of every layer into one contiguous tensor.

    Returns a contiguous tensor of shape ``(num_layers, len(block_ids),
    *per_block_shape)`` (see :func:`staging_shape`) with the caches' dtype and
    device, where ``result[l, i]`` is bit-for-bit the block ``block_ids[i]`` of
    ``caches[l]`` with the block dim removed (other dims in their original
    order). Ids may repeat and need not be sorted; an empty id list gives an
    empty tensor. The caches are only read. One ``index_select`` per layer.

    Args:
        caches: Per-layer cache tensors, all of the same shape, dtype and
            device (they need not be contiguous).
        layout: Where the block dim is.
        block_ids: 1-D integer ids (list, tuple, range, numpy array, tensor).
        out: Optional preallocated contiguous staging tensor of exactly the
            canonical shape, dtype and device; it is filled and returned.

    Raises:
        ValueError: bad caches (naming the layer), an id out of range (naming
            it and its position), non-1-D ids, or an unsuitable ``out``.
        TypeError: non-integer ids.
    """
    return _gather(caches, layout, block_ids, out, None, "gather_blocks")


def scatter_blocks(
    caches: Sequence[torch.Tensor],
    layout: PagedLayout,
    block_ids: BlockIds,
    staging: torch.Tensor,
) -> None:
    """Write a staging tensor into the blocks ``block_ids`` of every layer.

    Inverse of :func:`gather_blocks`: afterwards block ``block_ids[i]`` of
    ``caches[l]`` equals ``staging[l, i]`` bit for bit, and every other block
    is untouched. ``block_ids`` may differ from the ids that were gathered and
    need not be sorted, but must be distinct. ``staging`` must have the
    canonical shape ``(num_layers, len(block_ids), *per_block_shape)``, the
    caches' dtype and the caches' device (move it with ``.to(device)`` first
    if needed); it need not be contiguous. One ``index_copy_`` per layer.

    Raises:
        ValueError: bad caches (naming the layer), an id out of range or
            repeated (naming it), non-1-D ids, or a staging tensor whose
            shape, dtype or device do not match (naming both).
        TypeError: non-integer ids.
    """
    _scatter(caches, layout, block_ids, staging, None, "scatter_blocks")


# --------------------------------------------------------------------------- #
# Head-sliced staging (tensor parallelism with different TP sizes)
# --------------------------------------------------------------------------- #


def head_dim_index(layout: PagedLayout) -> int:
    """Which dimension of ``layout``'s per-layer tensor indexes KV heads (its ``"head"`` dim).

    Raises:
        ValueError: the layout names no ``"head"`` dim (e.g. ``blocks_first``),
            so a head range cannot be located in it.
    """
    if "head" not in layout.dims:
        raise ValueError(
            f"layout {layout.name!r} has no 'head' dim (dims={layout.dims!r}); head-sliced "
            f"gather/scatter needs a layout whose dims name the KV-head dimension"
        )
    return layout.dims.index("head")


def _head_slice(
    shape: torch.Size, layout: PagedLayout, head_start: int, num_heads: int, what: str
) -> Tuple[int, int, int]:
    """Validate a head range against ``shape``; return ``(head_dim, head_start, num_heads)``."""
    hd = head_dim_index(layout)
    total = int(shape[hd])
    for name, v in (("head_start", head_start), ("num_heads", num_heads)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{what}: {name} must be an int, got {v!r}")
    if head_start < 0 or num_heads < 1 or head_start + num_heads > total:
        raise ValueError(
            f"{what}: heads [{head_start}, {head_start + num_heads}) are not inside the "
            f"cache's {total} KV heads (layout {layout.name!r}, shape {tuple(shape)})"
        )
    return hd, head_start, num_heads


def _narrowed_shape(
    caches: Sequence[torch.Tensor], layout: PagedLayout, heads: Optional[Tuple[int, int]], what: str
) -> Tuple[torch.Size, torch.dtype, torch.device, Optional[Tuple[int, int, int]]]:
    """Common (shape, dtype, device) of ``caches`` with the head dim cut to ``heads``."""
    shape, dtype, device = _check_caches(caches, layout)
    if heads is None:
        return shape, dtype, device, None
    hs = _head_slice(shape, layout, heads[0], heads[1], what)
    cut = list(shape)
    cut[hs[0]] = hs[2]
    return torch.Size(cut), dtype, device, hs


def _layer_view(cache: torch.Tensor, hs: Optional[Tuple[int, int, int]]) -> torch.Tensor:
    """``cache`` as raw bits, narrowed to the head range ``hs`` when given (a view)."""
    bits = _bits(cache)
    return bits if hs is None else bits.narrow(hs[0], hs[1], hs[2])


def head_staging_shape(
    caches: Sequence[torch.Tensor], layout: PagedLayout, num_ids: int, num_heads: int
) -> torch.Size:
    """Staging shape of :func:`gather_block_heads` for ``num_heads`` heads of ``num_ids`` blocks.

    Like :func:`staging_shape` with the head dim's size replaced by ``num_heads``.
    """
    shape, _, _, _ = _narrowed_shape(caches, layout, (0, num_heads), "head_staging_shape")
    return _staging_of(shape, layout, len(caches), num_ids)


def gather_block_heads(
    caches: Sequence[torch.Tensor],
    layout: PagedLayout,
    block_ids: BlockIds,
    head_start: int,
    num_heads: int,
    *,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`gather_blocks` restricted to KV heads ``[head_start, head_start + num_heads)``.

    Returns a contiguous tensor of :func:`head_staging_shape` where
    ``result[l, i]`` is bit-for-bit block ``block_ids[i]`` of ``caches[l]``
    with the block dim removed and the head dim (see :func:`head_dim_index`)
    cut to the range. Works for any layout naming its ``"head"`` dim
    (``vllm_cpu``, ``flash_attn``, ``flashinfer``); the caches are only read.

    Raises:
        ValueError: as :func:`gather_blocks`, plus a layout without a head
            dim or a head range outside the cache's heads (naming both).
        TypeError: non-integer ids or head bounds.
    """
    return _gather(caches, layout, block_ids, out, (head_start, num_heads), "gather_block_heads")


def scatter_block_heads(
    caches: Sequence[torch.Tensor],
    layout: PagedLayout,
    block_ids: BlockIds,
    staging: torch.Tensor,
    head_start: int,
) -> None:
    """Write ``staging`` into heads ``[head_start, head_start + n)`` of blocks ``block_ids``.

    ``n`` is ``staging``'s size along the head dim; ``staging`` has
    :func:`head_staging_shape` for ``n`` heads. Afterwards those heads of
    block ``block_ids[i]`` of ``caches[l]`` equal ``staging[l, i]`` bit for
    bit; the other heads of those blocks and every other block are untouched,
    so several sources (prefill ranks) can fill one block head range by head
    range. ``block_ids`` must be distinct.

    Raises:
        ValueError: as :func:`scatter_blocks`, plus a layout without a head
            dim or a head range outside the cache's heads.
        TypeError: non-integer ids or head bounds.
    """
    if not isinstance(staging, torch.Tensor):
        raise ValueError(f"scatter_block_heads staging: expected a torch.Tensor, got {type(staging).__name__}")
    hd = head_dim_index(layout)
    st_hd = 2 + (hd if hd < layout.block_dim else hd - 1)  # the head dim inside a staging tensor
    if staging.dim() <= st_hd:
        raise ValueError(
            f"scatter_block_heads staging: shape {tuple(staging.shape)} has no head dim {st_hd} "
            f"(expected (num_layers, num_ids, *per_block_shape) for layout {layout.name!r})"
        )
    heads = (head_start, int(staging.shape[st_hd]))
    _scatter(caches, layout, block_ids, staging, heads, "scatter_block_heads")


# --------------------------------------------------------------------------- #
# Shared staging implementation
# --------------------------------------------------------------------------- #


def _gather(
    caches: Sequence[torch.Tensor],
    layout: PagedLayout,
    block_ids: BlockIds,
    out: Optional[torch.Tensor],
    heads: Optional[Tuple[int, int]],
    what: str,
) -> torch.Tensor:
    shape, dtype, device, hs = _narrowed_shape(caches, layout, heads, what)
    bd = layout.block_dim
    nb = int(shape[bd])
    idx = _ids_tensor(block_ids, nb, device, f"{what} block_ids")
    want = _staging_of(shape, layout, len(caches), idx.numel())
    if out is None:
        out = torch.empty(want, dtype=dtype, device=device)
    else:
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"{what} out: expected a torch.Tensor, got {type(out).__name__}")
        if out.shape != want:
            raise ValueError(
                f"{what} out: shape {tuple(out.shape)} != expected staging shape {tuple(want)}"
            )
        if out.dtype != dtype:
            raise ValueError(f"{what} out: dtype {out.dtype} != caches dtype {dtype}")
        if out.device != device:
            raise ValueError(f"{what} out: device {out.device} != caches device {device}")
        if not out.is_contiguous():
            raise ValueError(f"{what} out: staging tensor must be contiguous")
    out_bits = _bits(out)
    with torch.no_grad():
        for layer, cache in enumerate(caches):
            src = _layer_view(cache, hs)
            if bd:
                src = src.movedim(bd, 0)
            torch.index_select(src, 0, idx, out=out_bits[layer])
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "%s: layout=%s layers=%d ids=%d heads=%s -> %s %s (%d bytes)",
            what, layout.name, len(caches), idx.numel(), heads, tuple(out.shape), dtype,
            out.numel() * out.element_size(),
        )
    return out


def _scatter(
    caches: Sequence[torch.Tensor],
    layout: PagedLayout,
    block_ids: BlockIds,
    staging: torch.Tensor,
    heads: Optional[Tuple[int, int]],
    what: str,
) -> None:
    shape, dtype, device, hs = _narrowed_shape(caches, layout, heads, what)
    bd = layout.block_dim
    nb = int(shape[bd])
    idx = _ids_tensor(block_ids, nb, device, f"{what} block_ids", unique=True)
    want = _staging_of(shape, layout, len(caches), idx.numel())
    if not isinstance(staging, torch.Tensor):
        raise ValueError(f"{what} staging: expected a torch.Tensor, got {type(staging).__name__}")
    if staging.shape != want:
        raise ValueError(
            f"{what} staging: shape {tuple(staging.shape)} does not match the "
            f"expected shape {tuple(want)} (num_layers, num_ids, *per_block_shape)"
        )
    if staging.dtype != dtype:
        raise ValueError(f"{what} staging: dtype {staging.dtype} != caches dtype {dtype}")
    if staging.device != device:
        raise ValueError(f"{what} staging: device {staging.device} != caches device {device}")
    st_bits = _bits(staging)
    with torch.no_grad():
        for layer, cache in enumerate(caches):
            src = st_bits[layer]
            if bd:
                src = src.movedim(0, bd)
            _layer_view(cache, hs).index_copy_(bd, idx, src)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "%s: layout=%s layers=%d ids=%d heads=%s <- %s %s",
            what, layout.name, len(caches), idx.numel(), heads, tuple(staging.shape), dtype,
        )


# --------------------------------------------------------------------------- #
# Zero-copy path
# --------------------------------------------------------------------------- #


def _runs_from_breaks(ids: np.ndarray, breaks: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Run start positions and lengths for ``ids`` split after ``breaks`` (positions)."""
    starts = np.concatenate(([0], breaks)).astype(np.int64)
    ends = np.concatenate((breaks, [ids.size])).astype(np.int64)
    return starts, ends - starts


def coalesce_runs(block_ids: BlockIds) -> List[Tuple[int, int]]:
    """Split ``block_ids`` into maximal runs of consecutive ids, in the given order.

    Returns ``[(start_id, length), ...]`` such that concatenating
    ``range(start, start + length)`` over the runs reproduces ``block_ids``
    exactly: e.g. ``[3, 4, 5, 9]`` -> ``[(3, 3), (9, 1)]`` and ``[5, 4]`` ->
    ``[(5, 1), (4, 1)]`` (ids are never reordered, since position ``i`` pairs
    with position ``i`` of the peer). Empty input gives ``[]``. Ids are not
    range-checked here. Vectorised with numpy; for a CUDA tensor the ids are
    first copied to the host.
    """
    ids = _ids_numpy(block_ids)
    if ids.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    pos, lengths = _runs_from_breaks(ids, breaks)
    return list(zip(ids[pos].tolist(), lengths.tolist()))


def _run_views(
    caches: Sequence[torch.Tensor],
    layout: PagedLayout,
    starts: Sequence[int],
    lengths: Sequence[int],
    what: str,
) -> List[torch.Tensor]:
    """Contiguous views of ``caches`` for each (start, length) block run.

    Order: layer-major, then run, then index over the dims before the block
    dim in row-major order (for flash_attn: K then V).
    """
    bd = layout.block_dim
    views: List[torch.Tensor] = []
    for layer, cache in enumerate(caches):
        leading = list(itertools.product(*(range(s) for s in cache.shape[:bd])))
        for start, length in zip(starts, lengths):
            for lead in leading:
                v = cache[lead].narrow(0, start, length) if bd else cache.narrow(0, start, length)
                if not v.is_contiguous():
                    raise ValueError(
                        f"{what} layer {layer}: the view of blocks [{start}, {start + length}) "
                        f"(leading index {lead}) is not contiguous (cache shape "
                        f"{tuple(cache.shape)}, strides {cache.stride()}); zero-copy views need "
                        f"the dims from block_dim={bd} onward to be densely packed; use "
                        f"gather_blocks/scatter_blocks instead"
                    )
                views.append(v)
    return views


def block_views(
    caches: Sequence[torch.Tensor], layout: PagedLayout, block_ids: BlockIds
) -> List[torch.Tensor]:
    """Zero-copy, contiguous views of the cache memory holding ``block_ids``.

    The ids are split into runs of consecutive ids (:func:`coalesce_runs`).
    For every layer, every run, and every index over the dims *before* the
    block dim (none for ``block_dim=0``; K and V for flash_attn), one view is
    returned, in exactly that nesting order (layer, then run, then leading
    index in row-major order). Each view shares storage with its cache and is
    contiguous, so a transport may send from it or receive into it directly.
    A view covering run ``(s, n)`` has shape ``(n, *rest)`` where ``rest`` are
    the dims after the block dim.

    Sender and receiver get matching lists (same count and shapes) when their
    caches have the same per-block shape and their id lists have the same run
    structure (same run lengths in the same order); otherwise use
    :func:`matching_views`.

    Raises:
        ValueError: bad caches or ids (see :func:`gather_blocks`), or a cache
            whose block slices are not contiguous in memory (e.g. a transposed
            or strided cache), in which case use the staging path.
        TypeError: non-integer ids.
    """
    shape, _, _ = _check_caches(caches, layout)
    ids = _ids_numpy(block_ids, "block_views block_ids")
    _check_range_numpy(ids, int(shape[layout.block_dim]), "block_views block_ids")
    if ids.size == 0:
        return []
    runs = coalesce_runs(ids)
    starts = [s for s, _ in runs]
    lengths = [n for _, n in runs]
    return _run_views(caches, layout, starts, lengths, "block_views")


def matching_views(
    src_caches: Sequence[torch.Tensor],
    src_ids: BlockIds,
    dst_caches: Sequence[torch.Tensor],
    dst_ids: BlockIds,
    layout: PagedLayout,
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Paired zero-copy views so that block ``src_ids[i]`` maps to ``dst_ids[i]``.

    Runs are split at the union of both sides' breakpoints (wherever either
    id list stops being consecutive), so the returned lists have equal length
    and ``src_views[k].shape == dst_views[k].shape`` for every ``k``; doing
    ``dst_views[k].copy_(src_views[k])`` for all ``k`` (or sending each source
    view into the matching destination view) writes block ``src_ids[i]`` of
    every source layer into block ``dst_ids[i]`` of the same destination
    layer and touches nothing else. Ordering is as in :func:`block_views`.
    The two sides may live on different devices and have different block
    counts, but must have the same number of layers, dtype and per-block
    shape. ``dst_ids`` must be distinct (``src_ids`` may repeat).

    Raises:
        ValueError: mismatched layer counts, dtypes, per-block shapes or id
            list lengths; ids out of range; repeated destination ids;
            non-contiguous block slices (see :func:`block_views`).
        TypeError: non-integer ids.
    """
    s_shape, s_dtype, _ = _check_caches(src_caches, layout, "src_caches")
    d_shape, d_dtype, _ = _check_caches(dst_caches, layout, "dst_caches")
    bd = layout.block_dim
    if len(src_caches) != len(dst_caches):
        raise ValueError(
            f"matching_views: {len(src_caches)} source layers != {len(dst_caches)} destination layers"
        )
    if s_dtype != d_dtype:
        raise ValueError(f"matching_views: source dtype {s_dtype} != destination dtype {d_dtype}")
    s_rest = tuple(s_shape[:bd]) + tuple(s_shape[bd + 1 :])
    d_rest = tuple(d_shape[:bd]) + tuple(d_shape[bd + 1 :])
    if s_rest != d_rest:
        raise ValueError(
            f"matching_views: per-block shapes differ: source {tuple(s_shape)} vs "
            f"destination {tuple(d_shape)} (block_dim={bd})"
        )
    s = _ids_numpy(src_ids, "matching_views src_ids")
    d = _ids_numpy(dst_ids, "matching_views dst_ids")
    if s.size != d.size:
        raise ValueError(f"matching_views: {s.size} source ids != {d.size} destination ids")
    _check_range_numpy(s, int(s_shape[bd]), "matching_views src_ids")
    _check_range_numpy(d, int(d_shape[bd]), "matching_views dst_ids")
    _check_unique_numpy(d, "matching_views dst_ids")
    if s.size == 0:
        return [], []
    breaks = np.flatnonzero((np.diff(s) != 1) | (np.diff(d) != 1)) + 1
    pos, lengths = _runs_from_breaks(s, breaks)
    n_list = lengths.tolist()
    src_views = _run_views(src_caches, layout, s[pos].tolist(), n_list, "matching_views src")
    dst_views = _run_views(dst_caches, layout, d[pos].tolist(), n_list, "matching_views dst")
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "matching_views: layout=%s layers=%d ids=%d runs=%d views=%d",
            layout.name, len(src_caches), s.size, len(n_list), len(src_views),
        )
    return src_views, dst_views


def block_head_views(
    caches: Sequence[torch.Tensor],
    layout: PagedLayout,
    block_ids: BlockIds,
    head_start: int,
    num_heads: int,
) -> List[torch.Tensor]:
    """Zero-copy views of KV heads ``[head_start, head_start + num_heads)`` of each block.

    One view per layer, per id (in the given order), per index over the dims
    before the block dim, in that nesting order; each shares storage with
    its cache, has the block's shape with the head dim cut to ``num_heads``,
    and is contiguous, so a transport may send from it or receive into it.
    Two sides asking for the same number of ids and heads get lists of
    equal length and shapes, paired position by position. Blocks are not
    coalesced (a head slice of consecutive blocks is not one contiguous
    range); for all heads use :func:`block_views`.

    The views are contiguous only where a head is contiguous inside a block,
    e.g. ``vllm_cpu`` (heads right after the block dim); for ``flash_attn``
    (tokens before heads) this raises, use :func:`gather_block_heads`.

    Raises:
        ValueError: bad caches or ids (see :func:`gather_blocks`), a layout
            without a head dim, a head range outside the cache's heads, or a
            non-contiguous head slice.
        TypeError: non-integer ids or head bounds.
    """
    shape, _, _ = _check_caches(caches, layout)
    hd, head_start, num_heads = _head_slice(shape, layout, head_start, num_heads, "block_head_views")
    bd = layout.block_dim
    ids = _ids_numpy(block_ids, "block_head_views block_ids")
    _check_range_numpy(ids, int(shape[bd]), "block_head_views block_ids")
    inner_hd = hd - bd - 1  # the head dim inside one block's tensor (dims after the block dim)
    if inner_hd < 0:
        raise ValueError(
            f"block_head_views: layout {layout.name!r} has its head dim before the block dim; "
            f"a head slice of one block is not contiguous there, use gather_block_heads"
        )
    views: List[torch.Tensor] = []
    for layer, cache in enumerate(caches):
        leading = list(itertools.product(*(range(n) for n in cache.shape[:bd])))
        for block in ids.tolist():
            for lead in leading:
                v = (cache[lead] if bd else cache)[block].narrow(inner_hd, head_start, num_heads)
                if not v.is_contiguous():
                    raise ValueError(
                        f"block_head_views layer {layer}: heads [{head_start}, {head_start + num_heads}) "
                        f"of block {block} are not contiguous in layout {layout.name!r} (cache shape "
                        f"{tuple(cache.shape)}, strides {cache.stride()}); use gather_block_heads"
                    )
                views.append(v)
    return views
