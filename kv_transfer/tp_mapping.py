"""Which prefill tensor-parallel ranks a decode rank reads its KV heads from.

Pure logic (no vLLM, no UCX): given the prefill TP size ``P``, the decode TP
size ``D`` and the model's total number of KV heads ``H``, :func:`decode_reads`
tells decode rank ``r`` which prefill ranks to read, which heads of each
prefill rank's shard to take, and where they go in its own shard.

How vLLM shards KV heads over ``tp`` ranks (``QKVParallelLinear`` in
``vllm/model_executor/layers/linear.py``):

* ``H >= tp``: rank ``q`` holds ``H / tp`` heads, global heads
  ``[q * H/tp, (q+1) * H/tp)`` (``H`` must be a multiple of ``tp``);
* ``H < tp``: every rank holds one head; each group of ``tp / H``
  consecutive ranks shares (replicates) it: rank ``q`` holds head
  ``q // (tp / H)`` (``tp`` must be a multiple of ``H``).

Which prefill rank is read (the rule of vLLM's NIXL connector,
``kv_connector/v1/nixl/tp_mapping.py``):

* ``D >= P``: decode rank ``r`` reads one prefill rank, ``r // (D / P)``, and
  only the slice of its shard that ``r`` holds;
* ``P > D``: decode rank ``r`` reads prefill ranks ``r*k ... r*k + k - 1``
  (``k = P / D``) and places each shard at its head offset; when heads are
  replicated on prefill (``H < P``) only the first rank holding each head is
  read (a head is read once, not once per replica), so some prefill ranks are
  read by no decode rank at all (:func:`readers_per_prefill_rank` says 0).

A combination that cannot work (heads not divisible by a TP size, TP sizes
not multiples of each other) raises :class:`ParallelMismatchError` naming both
sides' values. :class:`KVCacheShape` with :func:`compat_problem` compares the
two sides' cache descriptions (total KV heads, head size, layers, dtype,
block size, layout, TP size) before any transfer.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional, Tuple

from .errors import KVTransferError

__all__ = [
    "ParallelMismatchError",
    "HeadRead",
    "kv_heads_per_rank",
    "rank_heads",
    "source_ranks",
    "decode_reads",
    "readers_per_prefill_rank",
    "rank_port",
    "check_tp_pair",
    "KVCacheShape",
    "compat_problem",
]

logger = logging.getLogger(__name__)


class ParallelMismatchError(KVTransferError, ValueError):
    """Prefill and decode parallel layouts (or cache shapes) cannot be combined."""


def _check_size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParallelMismatchError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_heads_tp(total_kv_heads: int, tp_size: int, side: str) -> None:
    if total_kv_heads % tp_size and tp_size % total_kv_heads:
        raise ParallelMismatchError(
            f"{side}: {total_kv_heads} KV heads cannot be sharded over TP {tp_size} "
            f"(one must be a multiple of the other)"
        )


def check_tp_pair(prefill_tp: int, decode_tp: int, total_kv_heads: int) -> None:
    """Raise :class:`ParallelMismatchError` unless prefill TP ``P`` and decode TP ``D`` can pair.

    Requires positive ints, ``H`` and each TP size to divide one another (as
    vLLM itself requires), and ``P`` and ``D`` to be multiples of one another.
    The message names both sides' values.
    """
    _check_size("prefill TP size", prefill_tp)
    _check_size("decode TP size", decode_tp)
    _check_size("total KV heads", total_kv_heads)
    _check_heads_tp(total_kv_heads, prefill_tp, f"prefill (TP {prefill_tp})")
    _check_heads_tp(total_kv_heads, decode_tp, f"decode (TP {decode_tp})")
    if prefill_tp % decode_tp and decode_tp % prefill_tp:
        raise ParallelMismatchError(
            f"prefill TP {prefill_tp} and decode TP {decode_tp} are not multiples of one "
            f"another ({total_kv_heads} KV heads); a decode rank would straddle prefill ranks"
        )


def kv_heads_per_rank(total_kv_heads: int, tp_size: int) -> int:
    """KV heads each rank holds: ``H / tp`` when ``H >= tp``, else 1 (replicated)."""
    _check_size("total KV heads", total_kv_heads)
    _check_size("TP size", tp_size)
    _check_heads_tp(total_kv_heads, tp_size, f"TP {tp_size}")
    return max(1, total_kv_heads // tp_size)


def rank_heads(total_kv_heads: int, tp_size: int, rank: int) -> range:
    """Global KV head ids rank ``rank`` of a TP ``tp_size`` instance holds, in shard order."""
    n = kv_heads_per_rank(total_kv_heads, tp_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < tp_size:
        raise ParallelMismatchError(f"rank must be an int in [0, {tp_size}), got {rank!r}")
    first = rank * total_kv_heads // tp_size  # == rank // (tp / H) when H < tp
    return range(first, first + n)


@dataclass(frozen=True)
class HeadRead:
    """One read a decode rank makes from one prefill rank.

    Heads ``[src_head, src_head + num_heads)`` of the prefill rank's shard go
    to heads ``[dst_head, dst_head + num_heads)`` of the decode rank's shard
    (both are offsets within the rank's own shard, not global head ids);
    ``global_head`` is the global id of the first head moved.
    """

    prefill_rank: int
    src_head: int
    dst_head: int
    num_heads: int
    global_head: int


def source_ranks(prefill_tp: int, decode_tp: int, total_kv_heads: int, decode_rank: int) -> Tuple[int, ...]:
    """Prefill ranks decode rank ``decode_rank`` reads, in ascending order (see :func:`decode_reads`)."""
    return tuple(rd.prefill_rank for rd in decode_reads(prefill_tp, decode_tp, total_kv_heads, decode_rank))


def decode_reads(
    prefill_tp: int, decode_tp: int, total_kv_heads: int, decode_rank: int
) -> Tuple[HeadRead, ...]:
    """The reads that fill decode rank ``decode_rank``'s KV shard, ordered by destination head.

    Promises: the reads' destination ranges cover ``[0, kv_heads_per_rank(H,
    D))`` exactly once; each read's heads are held by its prefill rank (at
    the stated offset) and are the same global heads the decode rank holds;
    no two reads carry the same global head. Prefill ranks are chosen as
    described in the module docstring.

    Raises:
        ParallelMismatchError: a combination that cannot work (see
            :func:`check_tp_pair`) or a decode rank out of range.
    """
    check_tp_pair(prefill_tp, decode_tp, total_kv_heads)
    want = rank_heads(total_kv_heads, decode_tp, decode_rank)
    if decode_tp >= prefill_tp:
        candidates = [decode_rank // (decode_tp // prefill_tp)]
    else:
        k = prefill_tp // decode_tp
        candidates = list(range(decode_rank * k, decode_rank * k + k))
    reads = []
    covered = want.start  # heads are covered left to right
    for p in candidates:
        have = rank_heads(total_kv_heads, prefill_tp, p)
        lo, hi = max(covered, have.start), min(want.stop, have.stop)
        if lo >= hi:
            continue  # a replica of a head already read (or, never, a foreign rank)
        if lo != covered:
            raise AssertionError(f"gap in heads {covered}..{lo} for decode rank {decode_rank}")
        reads.append(HeadRead(p, lo - have.start, lo - want.start, hi - lo, lo))
        covered = hi
    if covered != want.stop:  # unreachable when check_tp_pair passed; kept as a guard
        raise AssertionError(
            f"decode rank {decode_rank} (TP {decode_tp}) heads {want} not covered by prefill "
            f"ranks {candidates} (TP {prefill_tp}, {total_kv_heads} KV heads)"
        )
    return tuple(reads)


def readers_per_prefill_rank(prefill_tp: int, decode_tp: int, total_kv_heads: int) -> Tuple[int, ...]:
    """How many decode ranks read each prefill rank's shard of a request.

    A prefill rank may drop a request's entry once this many decode ranks
    have read it (0: nobody will; it need not keep the entry at all).
    """
    counts = [0] * prefill_tp
    for r in range(decode_tp):
        for p in source_ranks(prefill_tp, decode_tp, total_kv_heads, r):
            counts[p] += 1
    return tuple(counts)


def rank_port(
    kv_port: int,
    tp_rank: int,
    tp_size: int,
    *,
    pp_rank: int = 0,
    pp_size: int = 1,
    dp_index: int = 0,
) -> int:
    """The KV port of one worker: ``kv_port + dp_index*tp_size*pp_size + pp_rank*tp_size + tp_rank``.

    An engine (one DP index) uses ``tp_size * pp_size`` consecutive ports from
    its base ``rank_port(kv_port, 0, tp_size, pp_size=pp_size,
    dp_index=dp_index)``; TP 1 / PP 1 / DP 0 is ``kv_port`` itself.

    Raises:
        ParallelMismatchError: a size below 1, a rank or DP index out of
            range, or a port beyond 65535 (naming the values).
    """
    _check_size("TP size", tp_size)
    _check_size("PP size", pp_size)
    for name, v, hi in (("tp_rank", tp_rank, tp_size), ("pp_rank", pp_rank, pp_size),
                        ("dp_index", dp_index, None), ("kv_port", kv_port, None)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (hi is not None and v >= hi):
            bound = f"[0, {hi})" if hi is not None else ">= 0"
            raise ParallelMismatchError(f"{name} must be an int in {bound}, got {v!r}")
    port = kv_port + dp_index * tp_size * pp_size + pp_rank * tp_size + tp_rank
    if not 0 < port <= 65535:
        raise ParallelMismatchError(
            f"KV port {port} (kv_port {kv_port}, TP rank {tp_rank}/{tp_size}, PP rank "
            f"{pp_rank}/{pp_size}, DP index {dp_index}) is not a valid TCP port"
        )
    return port


# --------------------------------------------------------------------------- #
# Compatibility of the two sides' caches
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class KVCacheShape:
    """What one side's KV cache looks like, for comparison with its peer.

    ``total_kv_heads`` is the model's total (not per rank); ``layout`` is a
    layout name (e.g. ``PagedLayout.name`` or vLLM's ``kv_cache_layout``);
    ``dtype`` is the cache dtype as a string. Serialisable with
    :meth:`to_dict` / :meth:`from_dict` (values as JSON scalars) so it can
    ride in ``kv_transfer_params``.
    """

    total_kv_heads: int
    head_size: int
    num_layers: int
    dtype: str
    block_size: int
    layout: str
    tp_size: int

    def __post_init__(self) -> None:
        for name in ("total_kv_heads", "head_size", "num_layers", "block_size", "tp_size"):
            _check_size(f"KVCacheShape.{name}", getattr(self, name))
        for name in ("dtype", "layout"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                raise ParallelMismatchError(f"KVCacheShape.{name} must be a non-empty str, got {v!r}")
        _check_heads_tp(self.total_kv_heads, self.tp_size, f"KVCacheShape (TP {self.tp_size})")

    def to_dict(self) -> dict:
        """A JSON-compatible dict; ``from_dict(to_dict())`` round-trips."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "KVCacheShape":
        """Build from :meth:`to_dict` output; a missing or unknown key raises ParallelMismatchError."""
        if not isinstance(data, Mapping):
            raise ParallelMismatchError(f"KVCacheShape.from_dict expects a mapping, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        unknown = sorted(set(data) - set(names))
        if missing or unknown:
            raise ParallelMismatchError(
                f"KVCacheShape.from_dict: missing keys {missing}, unknown keys {unknown}"
            )
        return cls(**{n: data[n] for n in names})


def compat_problem(prefill: KVCacheShape, decode: KVCacheShape) -> Optional[str]:
    """Why decode cannot load prefill's KV, or ``None`` when it can.

    Every field except ``tp_size`` must be equal; the TP sizes must pair
    (:func:`check_tp_pair`). The message lists every mismatch as
    ``field: prefill=X decode=Y``, joined by ``"; "``.
    """
    problems = [
        f"{f.name}: prefill={getattr(prefill, f.name)!r} decode={getattr(decode, f.name)!r}"
        for f in fields(KVCacheShape)
        if f.name != "tp_size" and getattr(prefill, f.name) != getattr(decode, f.name)
    ]
    if not problems:
        try:
            check_tp_pair(prefill.tp_size, decode.tp_size, prefill.total_kv_heads)
        except ParallelMismatchError as exc:
            problems.append(f"tp_size: prefill={prefill.tp_size} decode={decode.tp_size} ({exc})")
    return "; ".join(problems) or None
