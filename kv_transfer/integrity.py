"""End-to-end KV integrity: a per-block checksum computed where the bytes are, checked before a load counts.

The producer computes :func:`block_sums` of a request's staging tensor right
after the gather (one reduction on the tensor's own device: no host copy, no
synchronisation on CUDA) and stores the result as the entry's ``value`` part,
which the paged entry format otherwise leaves empty. The consumer recomputes it
over what arrived, on the destination device, and compares (one small
synchronisation) *before* it writes a single block: a mismatch is a load error
(every block of the range failed, cause ``integrity``), so vLLM recomputes the
request instead of decoding from wrong KV.

What the checksum is: for each layer and block, the wrapping int64 sum of the
block's bytes read as 64-bit words (32-bit or 8-bit words where a block's size
is not a multiple of 8 bytes). It catches any single flipped bit, zeroed or torn
blocks, stale memory, blocks or layers swapped or taken from another request;
it does not catch two 8-byte words of one block exchanged with each other (a
plain sum is order-blind inside a block). It guards against accidents (memory
reused under a live transfer, a buggy path), not against an attacker, who can
recompute it: authentication of peers is :mod:`transport.auth`'s job.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from .errors import KVTransferError

log = logging.getLogger(__name__)

__all__ = ["block_sums", "verify_block_sums", "flip_one_byte", "IntegrityError"]


class IntegrityError(KVTransferError):
    """What arrived does not match the checksum the producer computed (the KV is not used)."""


def _words(t: torch.Tensor) -> torch.Tensor:
    """``t`` ``(layers, blocks, *per_block)`` as ``(layers * blocks, words)`` of its raw bytes (no copy if contiguous)."""
    rows = int(t.shape[0]) * int(t.shape[1])
    raw = t.contiguous().view(torch.uint8).reshape(rows, -1) if t.element_size() == 1 or t.dim() > 2 else None
    if raw is None:  # (layers, blocks) of wider elements: view the bytes along a new last dim
        raw = t.contiguous().unsqueeze(-1).view(torch.uint8).reshape(rows, -1)
    row_bytes = raw.shape[1]
    for dt, size in ((torch.int64, 8), (torch.int32, 4)):
        if row_bytes % size == 0 and row_bytes:
            return raw.view(dt)
    return raw


def block_sums(staging: torch.Tensor) -> torch.Tensor:
    """Per-layer, per-block checksums of a staging tensor ``(layers, blocks, *per_block)``: int64 ``(layers, blocks)``.

    Computed on ``staging``'s device; the result stays there (no synchronisation).
    """
    if staging.dim() < 2:
        raise ValueError(f"block_sums: expected (layers, blocks, ...), got shape {tuple(staging.shape)}")
    w = _words(staging)
    return w.sum(dim=1, dtype=torch.int64).reshape(staging.shape[0], staging.shape[1])


def verify_block_sums(layers: list[torch.Tensor], expected: Optional[torch.Tensor], what: str) -> None:
    """Check per-layer tensors ``(blocks, *per_block)`` that arrived against the producer's :func:`block_sums`.

    Raises :class:`IntegrityError` naming ``what``, the first bad layer and
    block, when ``expected`` is missing, of the wrong shape, or differs.
    """
    if not isinstance(expected, torch.Tensor):
        raise IntegrityError(f"{what}: the entry carries no checksum (is the producer running with verify_kv off?)")
    n_blocks = int(layers[0].shape[0]) if layers and layers[0].dim() else 0
    if expected.dtype != torch.int64 or tuple(expected.shape) != (len(layers), n_blocks):
        raise IntegrityError(f"{what}: checksum of shape {tuple(expected.shape)} {expected.dtype}, expected "
                             f"({len(layers)}, {n_blocks}) int64")
    dev = layers[0].device
    got = torch.stack([_words(t.unsqueeze(0)).sum(dim=1, dtype=torch.int64) for t in layers])
    exp = expected.to(dev)
    if torch.equal(got, exp):
        return
    bad = (got != exp).nonzero()
    layer, block = (int(x) for x in bad[0].tolist())
    raise IntegrityError(f"{what}: checksum mismatch in {bad.shape[0]} block(s), first at layer {layer} "
                         f"block {block}: the KV was corrupted between prefill's gather and decode")


def flip_one_byte(block: int = 0) -> Callable[[object, torch.Tensor], None]:
    """Testing only: a tamper hook for :meth:`KVProducer.save` that flips one bit of ``block`` in layer 0."""

    def tamper(_request: object, staging: torch.Tensor) -> None:
        b = min(block, staging.shape[1] - 1)
        raw = staging[0, b].reshape(-1).view(torch.uint8)
        raw[0] ^= 1
        log.warning("debug: flipped one bit of staged block %d, layer 0", b)

    return tamper
