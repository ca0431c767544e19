"""KV cache groups (vLLM's hybrid memory allocator): which layers share a block table, and which blocks move.

With the hybrid allocator on, a model mixing full attention and sliding-window
layers has one KV cache *group* per kind of layer, each with its own block
table: vLLM hands the connector one block-id list per group
(``blocks.get_block_ids()``, ``scheduled_new_reqs[i].block_ids``, ...). The
layers of different groups may share memory (one tensor backs a layer of
each group); that is sound because a block id belongs to one group at a time.

What moves per group (the same rule on both sides, so positions pair up):

* full attention: every block of the prompt;
* sliding window ``w``: only the prompt's last ``cdiv(w, block_size) + 1``
  blocks (the ones the next token's window can reach, plus one for a window
  not aligned to blocks, as vLLM's NIXL connector does). Blocks before them
  may already be vLLM's null block (id 0) and are never read or written.

Each group's blocks travel as their own entry (request id ``rid`` for the
first group, ``rid#g<i>`` for the others), so one group is exactly the
single-table case of before. Among several groups, other kinds (Mamba state,
chunked local attention, ...) are refused at startup with the kind named.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import KVTransferError

log = logging.getLogger(__name__)

__all__ = ["KVGroup", "kv_groups", "describe_groups", "group_entry_id", "transfer_blocks", "NULL_BLOCK"]

#: vLLM's null block: the placeholder for blocks a sliding window dropped; never read or written.
NULL_BLOCK = 0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KVGroup:
    """One KV cache group the connector transfers.

    Attributes:
        index: Its position in vLLM's per-group block-id tuples (``kv_cache_groups`` order).
        layer_names: Its layers (empty when unknown: then every registered layer).
        block_size: Tokens per block.
        window: Sliding window in tokens; 0 for full attention.
    """

    index: int
    layer_names: tuple[str, ...]
    block_size: int
    window: int = 0

    def kind(self) -> str:
        """``full`` or ``sliding<window>`` (as in the compatibility record)."""
        return f"sliding{self.window}" if self.window else "full"

    def transfer_range(self, num_tokens: int) -> tuple[int, int]:
        """Positions ``[first, end)`` of the prompt's blocks this group moves for ``num_tokens`` tokens."""
        end = _cdiv(num_tokens, self.block_size)
        if not self.window:
            return 0, end
        return max(0, end - (_cdiv(self.window, self.block_size) + 1)), end


def _window(spec: Any, several: bool, index: int, layer_names: Sequence[str]) -> int:
    """A group's sliding window (0: full attention); a kind this connector cannot move among several is refused."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec, SlidingWindowSpec

    inner = getattr(spec, "kv_cache_specs", None)  # UniformTypeKVCacheSpecs: one kind, several shapes
    specs = list(inner.values()) if isinstance(inner, dict) and inner else [spec]
    if all(isinstance(s, SlidingWindowSpec) for s in specs) and len({s.sliding_window for s in specs}) == 1:
        return int(specs[0].sliding_window)
    if several and not all(type(s) in (FullAttentionSpec, MLAAttentionSpec) for s in specs):
        # one group of any kind moves every block, as before hybrid support; among several, only known kinds
        raise KVTransferError(
            f"UcxConnector moves full-attention and sliding-window KV cache groups only; group {index} "
            f"({len(layer_names)} layers, e.g. {list(layer_names[:1])}) is {type(spec).__name__}")
    return 0


def kv_groups(kv_cache_config: Any, block_size: int) -> list[KVGroup]:
    """The groups of ``kv_cache_config`` that take part in KV transfer; one full group of every layer if unknown.

    Raises:
        KVTransferError: among several groups, one of a kind this connector cannot move (not full
            attention or sliding window, e.g. Mamba state); a single group of any kind moves every block.
    """
    groups = getattr(kv_cache_config, "kv_cache_groups", None)
    if not groups:
        return [KVGroup(0, (), int(block_size))]
    moved = [(i, g) for i, g in enumerate(groups) if getattr(g, "enable_kv_transfer", True)]
    if not moved:
        raise KVTransferError("kv_cache_config has no KV cache group that takes part in KV transfer")
    return [KVGroup(i, tuple(g.layer_names), int(getattr(g.kv_cache_spec, "block_size", block_size)),
                    _window(g.kv_cache_spec, len(moved) > 1, i, g.layer_names)) for i, g in moved]


def describe_groups(groups: Sequence[KVGroup]) -> str:
    """The groups as the compatibility record states them, e.g. ``full/2,sliding64/2`` (kind/layer count)."""
    return ",".join(f"{g.kind()}/{len(g.layer_names) or '*'}" for g in groups)


def group_entry_id(req_id: str, position: int) -> str:
    """The lookup key of the ``position``-th transferred group's entry of ``req_id`` (``req_id`` itself for the first)."""
    return req_id if position == 0 else f"{req_id}#g{position}"


def transfer_blocks(groups: Sequence[KVGroup], block_ids: Sequence[Sequence[int]], num_tokens: int,
                    skip_tokens: int = 0) -> tuple[list[list[int]], list[int]]:
    """Per transferred group, the block ids to move for a prompt of ``num_tokens`` and how many of them to skip.

    ``block_ids`` is vLLM's tuple of one list per KV cache group (indexed by
    :attr:`KVGroup.index`). ``skip_tokens`` are tokens already present locally
    (decode's prefix cache): their blocks are not written. Null blocks inside
    a range (dropped by a sliding window) are skipped too, never written.
    """
    ids_out, skips = [], []
    for g in groups:
        first, end = g.transfer_range(num_tokens)
        ids = [int(b) for b in block_ids[g.index][first:end]]
        skip = max(0, min(len(ids), skip_tokens // g.block_size - first))
        while skip < len(ids) and ids[skip] == NULL_BLOCK:
            skip += 1
        ids_out.append(ids)
        skips.append(skip)
    return ids_out, skips
