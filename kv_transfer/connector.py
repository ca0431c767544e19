"""Engine-agnostic connector core: a KV producer and a KV consumer over the LookupBuffer.

The producer (prefill side) copies a request's blocks out of its per-layer
paged caches into staging tensors (:func:`kv_transfer.paged.gather_blocks`)
and inserts them into a :class:`LookupBuffer` keyed by the request id *and*
its token ids. The consumer (decode side) fetches the entry for each of its
requests through any :class:`~kv_transfer.KVSource` (a local
:class:`LookupBuffer`, a :class:`LookupClient`, or a
:class:`MultiProducerClient`) and scatters the blocks into its **own** block
ids (:func:`kv_transfer.paged.scatter_blocks`), reporting per request which
blocks arrived.

Entry format (one per request, or one per request and layer):
``input_tokens`` = the token ids (int64), ``roi`` = None, ``key`` = a list of
per-layer staging tensors, each ``(num_blocks, *per_block_shape)``, ``value``
= None (the paged layouts here keep K and V in one tensor per layer), or with
``checksum`` on the int64 ``(layers, blocks)`` per-block checksums of
:mod:`kv_transfer.integrity`, ``hidden`` = the optional hidden states. Per-layer tensors are views of one
contiguous gather, so the server sends them without another copy.

Why staging and not block views: sending :func:`block_views` would save the
producer's gather copy, but it pins the engine's blocks until the consumer
fetched them (the engine could not reuse them for other requests meanwhile)
and it sends one tensor per run of consecutive ids and per K/V half instead
of one per layer; the transport's receive also cannot land into existing
memory, so the consumer copies once anyway. Staging decouples the two
engines' block lifetimes at the price of one device-local copy. Measured on
CPU with the test cases' random (fragmented) block ids, 2 layers: staging
costs ~20 us and 2 tensors per request, views ~30-60 us and 10-20 tensors
per request (one wire header each), so staging is also the faster one here.

Layer by layer: :meth:`KVProducer.save_layer` inserts one entry per request
for a single layer (request id ``"<id>@L<layer>"``), and
:meth:`KVConsumer.load_layer` fetches and scatters that layer, so a pipeline
can ship layer ``l`` while computing layer ``l + 1``.

Lifecycle: an entry is released when fetched, when its lease expires on the
producer, or on ``abort(request_id)`` from either side.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .errors import KVTransferError, KVUsageError, PeerUnavailableError
from .integrity import IntegrityError, block_sums, verify_block_sums
from .lookup_source import KVSource
from .lookup_store import LookupBuffer
from .paged import BlockIds, PagedLayout, gather_blocks, head_dim_index, scatter_block_heads, scatter_blocks

log = logging.getLogger(__name__)

__all__ = ["KVRequest", "LoadResult", "KVProducer", "KVConsumer", "layer_request_id", "FAILURE_CAUSES"]

TokenIds = Union[Sequence[int], torch.Tensor]


def layer_request_id(request_id: str, layer_idx: int) -> str:
    """The lookup key of one layer's entry of ``request_id``."""
    return f"{request_id}@L{int(layer_idx)}"


@dataclass(frozen=True)
class KVRequest:
    """One request as either engine sees it: its id, token ids, and its own block ids.

    ``skip_blocks`` (consumer only) is how many leading blocks the consumer
    already holds (e.g. from its prefix cache): a load covers the block range
    ``block_ids[skip_blocks:]``, writes nothing below it and reports nothing
    about it. The producer always stages every block.
    """

    request_id: str
    token_ids: TokenIds
    block_ids: BlockIds
    skip_blocks: int = 0

    def tokens_tensor(self) -> torch.Tensor:
        """The token ids as a 1-D int64 CPU tensor."""
        t = self.token_ids if isinstance(self.token_ids, torch.Tensor) else torch.as_tensor(list(self.token_ids))
        return t.detach().reshape(-1).to("cpu", torch.int64)

    def block_list(self) -> List[int]:
        """The block ids as a list of ints."""
        b = self.block_ids
        return [int(x) for x in (b.tolist() if hasattr(b, "tolist") else b)]


#: Called with (request, staging) after the checksum and before the insert (testing: corrupt in between).
Tamper = Callable[[KVRequest, torch.Tensor], None]


@dataclass
class LoadResult:
    """What arrived for one request. ``ok`` means every block of the range (and layer asked for) arrived.

    ``loaded_block_ids`` + ``failed_block_ids`` are exactly the request's
    ``block_ids[skip_blocks:]``, in order.
    """

    request_id: str
    ok: bool
    loaded_block_ids: List[int] = field(default_factory=list)
    failed_block_ids: List[int] = field(default_factory=list)
    hidden: Optional[torch.Tensor] = None
    error: Optional[str] = None
    #: Why the load failed, for metrics: one of :data:`FAILURE_CAUSES` (None when ``ok``).
    cause: Optional[str] = None


#: Causes of a failed load: the producer is gone or broke the pipe; it stayed silent past the
#: timeout; the entry does not fit this engine; no entry (lease ended, or never staged); the
#: checksum did not match (:mod:`kv_transfer.integrity`); anything else.
FAILURE_CAUSES = ("peer_dead", "timeout", "compat", "lease_expired", "integrity", "other")


def _fetch_failure_cause(exc: BaseException) -> str:
    """``timeout`` when the transport gave up waiting, ``peer_dead`` for any other broken pipe, else ``other``."""
    if not isinstance(exc, PeerUnavailableError):
        return "other"
    cause: Optional[BaseException] = exc.__cause__
    while cause is not None:
        if isinstance(cause, TimeoutError):
            return "timeout"
        cause = cause.__cause__
    return "peer_dead"


def _check_caches(caches: Sequence[torch.Tensor], layout: PagedLayout, who: str) -> List[torch.Tensor]:
    if isinstance(caches, torch.Tensor) or not caches:
        raise KVUsageError(f"{who}: caches must be a non-empty list of per-layer tensors")
    caches = list(caches)
    for i, c in enumerate(caches):
        layout.check_tensor(c, f"{who} layer {i}")
    return caches


class KVProducer:
    """Makes requests' KV available in a :class:`LookupBuffer` (prefill side).

    Args:
        buffer: Where entries go (typically served with :meth:`LookupBuffer.serve`).
        caches: The engine's per-layer paged caches (read only).
        layout: Their :class:`PagedLayout`.
        insert_timeout_s: How long an insert may wait for room (back-pressure).
        lease_s: Lease of each entry (None: the buffer's default).
        checksum: Store per-block checksums (:func:`~kv_transfer.integrity.block_sums`) as each
            entry's ``value`` part, for consumers that verify.
        retain: Whole-request entries survive fetches until ``abort(request_id)`` (the
            consumer's acknowledgement) or their lease (:meth:`LookupBuffer.insert`).
    """

    def __init__(self, buffer: LookupBuffer, caches: Sequence[torch.Tensor], layout: PagedLayout, *,
                 insert_timeout_s: float = 30.0, lease_s: Optional[float] = None, checksum: bool = False,
                 retain: bool = False):
        self.buffer = buffer
        self.caches = _check_caches(caches, layout, "KVProducer")
        self.layout = layout
        self.insert_timeout_s = float(insert_timeout_s)
        self.lease_s = lease_s
        self.checksum = bool(checksum)
        self.retain = bool(retain)

    def save(self, requests: Sequence[KVRequest], hidden: Optional[Mapping[str, torch.Tensor]] = None, *,
             tamper: Optional[Tamper] = None) -> None:
        """Gather every layer's blocks of each request and insert one entry per request.

        Returns once all entries are in the buffer. Raises
        :class:`BufferFullError` if the buffer stays full past
        ``insert_timeout_s`` (entries of earlier requests stay inserted).
        ``tamper`` (testing only) may alter the staged bytes after the checksum.
        """
        for r in requests:
            staging = gather_blocks(self.caches, self.layout, r.block_list())
            sums = block_sums(staging) if self.checksum else None
            if tamper is not None:
                tamper(r, staging)
            h = None if hidden is None else hidden.get(r.request_id)
            self.buffer.insert(r.tokens_tensor(), None, list(staging.unbind(0)), sums, h,
                               request_id=r.request_id, lease_s=self.lease_s, timeout=self.insert_timeout_s,
                               retain=self.retain)

    def save_layer(self, layer_idx: int, requests: Sequence[KVRequest]) -> None:
        """Insert one entry per request holding only layer ``layer_idx`` (see :func:`layer_request_id`)."""
        if not 0 <= layer_idx < len(self.caches):
            raise KVUsageError(f"save_layer: layer {layer_idx} outside [0, {len(self.caches)})")
        for r in requests:
            staging = gather_blocks([self.caches[layer_idx]], self.layout, r.block_list())
            self.buffer.insert(r.tokens_tensor(), None, [staging[0]], None, None,
                               request_id=layer_request_id(r.request_id, layer_idx), lease_s=self.lease_s,
                               timeout=self.insert_timeout_s)

    def abort(self, request_id: str) -> int:
        """Drop every entry of ``request_id`` (whole and per-layer); returns how many."""
        n = self.buffer.abort(request_id)
        for layer in range(len(self.caches)):
            n += self.buffer.abort(layer_request_id(request_id, layer))
        return n


class KVConsumer:
    """Fetches requests' KV into this engine's own blocks (decode side).

    Args:
        source: Where entries come from (a :class:`KVSource`: a
            :class:`LookupClient`, a :class:`MultiProducerClient` or a local
            :class:`LookupBuffer`).
        caches: The engine's per-layer paged caches (written only at the
            requests' block ids).
        layout: Their :class:`PagedLayout`.
        wait_s: Default bound on waiting for each request's entry.
        verify: Check every whole-request entry against the producer's checksum before writing
            anything (:mod:`kv_transfer.integrity`); no checksum or a mismatch fails the load.

    What a load promises, per request (one validation path for every engine):

    * no entry within ``wait_s``, the source unreachable, or an entry of the
      wrong kind (layer count, dtype, per-block shape, more blocks than
      ``block_ids``), or with ``verify`` a missing or wrong checksum: nothing
      is written, every block of the range failed;
    * an entry of ``n`` blocks with ``n < len(block_ids)`` (a short entry):
      the range's blocks below ``n`` are written and loaded, the rest failed,
      ``ok`` is False;
    * otherwise every block of the range is written, ``ok`` is True.
    The entry is consumed at the source in every case where it was found.
    """

    def __init__(self, source: KVSource, caches: Sequence[torch.Tensor], layout: PagedLayout, *,
                 wait_s: float = 5.0, verify: bool = False):
        self.source = source
        self.verify = bool(verify)
        self.caches = _check_caches(caches, layout, "KVConsumer")
        self.layout = layout
        self.wait_s = float(wait_s)
        self._per_block = layout.per_block_shape(self.caches[0])

    def _load_one(self, r: KVRequest, layers: List[int], request_id: str, wait_s: float,
                  heads: Optional[Tuple[int, int, int]] = None, readers: int = 1) -> LoadResult:
        dst = r.block_list()
        lo = int(r.skip_blocks)
        if not 0 <= lo <= len(dst):
            raise KVUsageError(f"request {r.request_id}: skip_blocks {lo} outside [0, {len(dst)}]")
        res = LoadResult(r.request_id, False, [], dst[lo:])
        per_block, kw = list(self._per_block), {}
        if heads is not None:  # the producer cuts its entry to our heads: [dim, start, length] of a layer tensor
            hd = head_dim_index(self.layout)
            pb_hd = hd if hd < self.layout.block_dim else hd - 1
            per_block[pb_hd] = heads[1]
            kw = {"narrow": [pb_hd + 1, heads[0], heads[1]], "readers": readers}
        elif readers != 1:
            kw = {"readers": readers}
        try:
            m = self.source.fetch(r.tokens_tensor(), None, request_id=request_id, wait_s=wait_s,
                                  device=self.caches[0].device, **kw)
        except KVTransferError as exc:
            res.error, res.cause = f"fetch failed: {exc}", _fetch_failure_cause(exc)
            return res
        if m is None:
            res.error, res.cause = f"no entry for {request_id} within {wait_s:.1f}s", "lease_expired"
            return res
        res.cause = "compat"  # until the entry's shape is accepted
        key = m.key
        if not isinstance(key, list) or len(key) != len(layers):
            got = type(key).__name__ if not isinstance(key, list) else f"{len(key)} layers"
            res.error = f"entry for {request_id} holds {got}, expected {len(layers)} layer tensor(s)"
            return res
        n = int(key[0].shape[0]) if key[0].dim() else -1
        want = (len(dst), *per_block)
        bad = [i for i, t in enumerate(key)
               if t.dtype != self.caches[0].dtype or tuple(t.shape[1:]) != tuple(per_block) or t.shape[0] != n]
        if bad or n < 0 or n > len(dst):
            t = key[bad[0] if bad else 0]
            res.error = (f"entry for {request_id}: layer tensor {t.dtype}{tuple(t.shape)} does not fit "
                         f"{self.caches[0].dtype}{want} (destination blocks)")
            return res
        res.cause = None
        # The checksums cover whole blocks of the producer's shard: a head-sliced (narrowed) entry
        # cannot be checked against them, so heterogeneous-TP reads go unverified (docs/operations.md).
        if self.verify and heads is None and len(layers) == len(self.caches):
            try:
                verify_block_sums(key, m.value if isinstance(m.value, torch.Tensor) else None,
                                  f"entry for {request_id}")
            except IntegrityError as exc:
                res.error, res.cause = str(exc), "integrity"
                return res
        hi = max(lo, n)  # blocks [lo, hi) arrived
        if hi > lo:
            dev = self.caches[0].device
            for li, t in zip(layers, key):
                staged = t[lo:hi].to(dev).unsqueeze(0)
                if heads is None:
                    scatter_blocks([self.caches[li]], self.layout, dst[lo:hi], staged)
                else:
                    scatter_block_heads([self.caches[li]], self.layout, dst[lo:hi], staged, heads[2])
        res.loaded_block_ids, res.failed_block_ids = dst[lo:hi], dst[hi:]
        res.hidden = m.hidden if isinstance(m.hidden, torch.Tensor) else None
        res.ok = n == len(dst)
        if not res.ok:
            res.error, res.cause = f"short entry: {n} of {len(dst)} blocks arrived for {request_id}", "other"
        return res

    def load(self, requests: Sequence[KVRequest], *, wait_s: Optional[float] = None) -> Dict[str, LoadResult]:
        """Fetch every layer of each request into its block ids; per-request results, never raises for data.

        See the class docstring for what each outcome writes and reports.
        """
        w = self.wait_s if wait_s is None else float(wait_s)
        layers = list(range(len(self.caches)))
        return {r.request_id: self._load_one(r, layers, r.request_id, w) for r in requests}

    def load_heads(self, request: KVRequest, src_head: int, num_heads: int, dst_head: int, *,
                   readers: int = 1, wait_s: Optional[float] = None) -> LoadResult:
        """Fetch KV heads ``[src_head, src_head + num_heads)`` of every layer of one request into heads from ``dst_head``.

        For tensor parallelism with different sizes: the producer holds one
        rank's shard, this consumer another; the fetch asks the producer to cut
        its entry to the head range (only those bytes cross the wire), shared by
        ``readers`` fetches (decode ranks reading the same prefill rank). Only
        the head range of the destination blocks is written (other heads are
        left for other sources). Outcomes as :meth:`load`.
        """
        w = self.wait_s if wait_s is None else float(wait_s)
        return self._load_one(request, list(range(len(self.caches))), request.request_id, w,
                              (int(src_head), int(num_heads), int(dst_head)), readers)

    def load_layer(self, layer_idx: int, requests: Sequence[KVRequest], *,
                   wait_s: Optional[float] = None) -> Dict[str, LoadResult]:
        """Fetch layer ``layer_idx`` of each request (saved with :meth:`KVProducer.save_layer`)."""
        if not 0 <= layer_idx < len(self.caches):
            raise KVUsageError(f"load_layer: layer {layer_idx} outside [0, {len(self.caches)})")
        w = self.wait_s if wait_s is None else float(wait_s)
        return {r.request_id: self._load_one(r, [layer_idx], layer_request_id(r.request_id, layer_idx), w)
                for r in requests}

    def abort(self, request_id: str, num_layers: Optional[int] = None) -> int:
        """Tell the producer(s) to drop ``request_id`` (and its per-layer entries); returns how many."""
        n = self.source.abort(request_id)
        for layer in range(len(self.caches) if num_layers is None else num_layers):
            n += self.source.abort(layer_request_id(request_id, layer))
        return n
