"""The shape of a lookup: query checks, the :class:`Match` answer, and the :class:`KVSource` protocol consumers fetch through.

A *source* is anything a consumer can fetch entries from: a local
:class:`~kv_transfer.LookupBuffer`, a :class:`~kv_transfer.LookupClient` (one
remote producer) or a :class:`~kv_transfer.MultiProducerClient` (several).
:class:`~kv_transfer.KVConsumer` accepts any :class:`KVSource`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Protocol, Sequence, runtime_checkable

import torch

from . import _lookup_wire as wire
from .errors import KVUsageError

__all__ = ["Match", "Part", "KVSource", "check_query", "check_readers", "narrow_part", "MAX_READERS"]

#: Most fetches one entry may be shared by (decode TP ranks reading one prefill rank).
MAX_READERS = 1024

#: One of an entry's key / value / hidden: None, a tensor, or a list of tensors (e.g. per layer).
Part = wire.Part


#: Whether a dtype holds integer token ids (not floating point, complex or bool), filled as dtypes are seen:
#: one dict lookup per query where the three checks cost ~0.2 µs (twice per remote lookup).
_TOKEN_DTYPES: Dict[torch.dtype, bool] = {}


def check_query(tokens: Optional[torch.Tensor], roi: Optional[torch.Tensor], what: str) -> None:
    """Refuse (:class:`KVUsageError`) tokens that are not integer ids, or a roi without tokens."""
    if tokens is not None:
        if not isinstance(tokens, torch.Tensor):
            raise KVUsageError(f"{what} input_tokens: expected a tensor or None, got {type(tokens).__name__}")
        ok = _TOKEN_DTYPES.get(tokens.dtype)
        if ok is None:
            ok = _TOKEN_DTYPES[tokens.dtype] = not (tokens.is_floating_point() or tokens.is_complex()
                                                    or tokens.dtype == torch.bool)
        if not ok:
            raise KVUsageError(f"{what} input_tokens: expected integer token ids, got {tokens.dtype}")
    if roi is not None:
        if not isinstance(roi, torch.Tensor):
            raise KVUsageError(f"{what} roi: expected a tensor or None, got {type(roi).__name__}")
        if tokens is None:
            raise KVUsageError(f"{what}: roi given without input_tokens")


def check_readers(readers: Any) -> int:
    """``readers`` as an int in ``[1, MAX_READERS]``; anything else raises :class:`KVUsageError`."""
    if isinstance(readers, bool) or not isinstance(readers, int) or not 1 <= readers <= MAX_READERS:
        raise KVUsageError(f"readers must be an int in [1, {MAX_READERS}], got {readers!r}")
    return readers


def narrow_part(part: Part, narrow: Optional[Sequence[int]], what: str) -> Part:
    """``part`` (a tensor or list of tensors) with each tensor cut to ``[dim, start, length]`` (contiguous copies).

    None ``narrow`` returns ``part`` unchanged. A ``narrow`` that is not three
    ints, or a range outside a tensor's dim, raises :class:`KVUsageError`
    naming the tensor's shape.
    """
    if narrow is None or part is None:
        return part
    if (not isinstance(narrow, (list, tuple)) or len(narrow) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in narrow)):
        raise KVUsageError(f"{what}: narrow must be [dim, start, length] (ints), got {narrow!r}")
    dim, start, length = narrow
    tensors = [part] if isinstance(part, torch.Tensor) else list(part)
    out = []
    for i, t in enumerate(tensors):
        if not 0 <= dim < t.dim() or start < 0 or length < 1 or start + length > t.shape[dim]:
            raise KVUsageError(f"{what}: narrow {list(narrow)} does not fit tensor {i} of shape {tuple(t.shape)}")
        out.append(t.narrow(dim, start, length).contiguous())
    return out[0] if isinstance(part, torch.Tensor) else out


@dataclass
class Match:
    """One selected entry. ``matched`` is how many masked tokens it shares with the query."""

    input_tokens: Optional[torch.Tensor]
    roi: Optional[torch.Tensor]
    key: Part
    value: Part
    hidden: Part
    matched: int
    request_id: Optional[str] = None

    def as_list(self) -> List[Any]:
        """``[input_tokens, roi, key, value, hidden]``, the seed's drop_select result."""
        return [self.input_tokens, self.roi, self.key, self.value, self.hidden]

    def to(self, device: Any) -> "Match":
        """The same match with every tensor moved to ``device``."""
        def mv(p: Part) -> Part:
            if p is None:
                return None
            if isinstance(p, torch.Tensor):
                return p.to(device)
            return [t.to(device) for t in p]

        return Match(mv(self.input_tokens), mv(self.roi), mv(self.key), mv(self.value), mv(self.hidden),
                     self.matched, self.request_id)


@runtime_checkable
class KVSource(Protocol):
    """Where a consumer fetches entries from (local buffer, one producer, several producers)."""

    def fetch(self, input_tokens: Optional[torch.Tensor] = None, roi: Optional[torch.Tensor] = None, *,
              request_id: Optional[str] = None, wait_s: float = 0.0, device: Any = None,
              narrow: Optional[List[int]] = None, readers: int = 1) -> Optional[Match]:
        """Select and drop the matching entry; None when nothing matched within ``wait_s`` seconds.

        ``narrow`` cuts every key tensor to ``[dim, start, length]``; the entry
        is dropped after ``readers`` fetches (see :meth:`LookupBuffer.claim`).

        Raises :class:`~kv_transfer.KVTransferError` subclasses when the source is unreachable.
        """
        ...

    def abort(self, request_id: str) -> int:
        """Drop ``request_id``'s entries at the source; returns how many."""
        ...
