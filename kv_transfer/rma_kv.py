"""Zero-staging KV transfer: decode GETs prefill's registered paged-cache blocks in place, under a lease.

Why one file of ~720 lines: the two ends of the kvrma protocol, its messages
and the piece arithmetic both ends must compute alike, read together.

Producer (:class:`RmaKVServer`): registers every layer cache once
(:func:`transport.register`), serves a :class:`transport.PipeListener` of
service ``kvrma`` and keeps each offered request's blocks under a
:class:`Lease` until the reader says it is done, the lease runs out, or the
reader's pipe dies; ``on_free(request_id)`` is then called exactly once (the
vLLM connector reports the request as sent there, and vLLM frees its blocks).
With ``retain`` (decode failover), ``Done`` and a reader's death do not free:
the blocks stay leased, so a second reader may claim and read them, until a
reader sends ``Ack`` (its request was answered in full) or the lease runs out
(``Done`` and ``Renew`` extend it by ``lease_s``). Whatever ends a lease, an
``Ack`` or a reader's ``Done`` or death never frees blocks another reader has
claimed and not yet finished reading: the free waits for that reader.

Consumer (:class:`RmaKVClient`): one pipe per producer. ``Hello`` fetches the
producer's descriptors and cache geometry once; a load is ``Claim`` (checks the
request id and a hash of its tokens, returns prefill's block ids and binds the
lease to this pipe), one :func:`transport.transfer_many` round for all layers
(GET into this side's registered caches; nothing is staged), then ``Done``,
whose answer says whether the lease still held when the GETs had completed.
A lease that ran out before ``Done`` arrived makes the load fail, because the
producer may already have reused those blocks. ``Renew`` keeps leases of
requests a reader still intends to read (or, retained, still serves) alive;
``Ack`` releases retained leases.

KV cache groups (vLLM's hybrid allocator): the layer caches are given group by
group (``group_layers`` says how many each group has, both sides alike); a lease
holds one block list per group and a load reads each group's blocks over that
group's layers, all in one GET round. Layers of different groups that share one
tensor (as vLLM lays them out) are registered once.

Pieces: a block of one layer is one contiguous piece per index over the dims
before the block dim (one for ``vllm_cpu``; a K and a V piece for
``flash_attn``); a KV-head range is one piece when the head dim directly
follows the block dim (``vllm_cpu``), else refused. Offsets come from each
side's own shape and strides, so the two caches may hold different block
counts. The wire is one :meth:`transport.Pipe.send_message` envelope per
message, with no tensors; its body is a :class:`transport.MessageCodec`
message (magic ``KVR\\0``, version u16, reserved u16, msgpack).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import msgspec
import numpy as np
import torch

import transport
from transport import (MessageCodec, PeerError, PeerTimeoutError, Pipe, PipeListener, PipeOptions, Registration,
                       RemoteMemory, RemoteProtocolError)

from ._serving import KV_PIPE_OPTIONS, accept_loop, stop_serving
from .errors import KVTransferError, KVUsageError, LookupProtocolError
from .paged import PagedLayout

log = logging.getLogger(__name__)

__all__ = ["SERVICE", "RMA_WIRE_VERSION", "RmaKVServer", "RmaKVClient", "RmaLoadResult", "Geometry",
           "block_pieces", "tokens_digest"]

SERVICE = "kvrma"
# Version history:
#   1: first release, a uint8 tensor holding magic, u16 version, msgpack.
#   2: a transport envelope whose body is a MessageCodec message (8-byte preamble).
#   3: Ack / Acked (a reader answered its request in full: a retained lease may go); KV cache
#      groups (HelloReply.group_layers, Claimed.more_groups: one block list per group).
RMA_WIRE_VERSION = 3
_MAGIC = b"KVR\x00"
_MAX_BODY = 4 << 20


# -- wire ------------------------------------------------------------------------
class LayerInfo(msgspec.Struct, frozen=True):
    descriptor: bytes
    shape: list[int]
    stride: list[int]  # in elements
    itemsize: int
    dtype: str


class Hello(msgspec.Struct, tag=True, frozen=True):
    seq: int


class Claim(msgspec.Struct, tag=True, frozen=True):
    seq: int
    request_id: str
    tokens_digest: str
    num_tokens: int
    readers: int = 1


class Renew(msgspec.Struct, tag=True, frozen=True):
    seq: int
    request_ids: list[str]


class Done(msgspec.Struct, tag=True, frozen=True):
    seq: int
    request_id: str


class Ack(msgspec.Struct, tag=True, frozen=True):
    seq: int
    request_ids: list[str]


class HelloReply(msgspec.Struct, tag=True, frozen=True):
    seq: int
    block_dim: int
    layers: list[LayerInfo]
    group_layers: list[int] = []  # layers per KV cache group, in order (empty: one group of every layer)


class Claimed(msgspec.Struct, tag=True, frozen=True):
    seq: int
    block_ids: list[int]
    lease_s: float
    more_groups: list[list[int]] = []  # the other KV cache groups' block ids, in order


class Renewed(msgspec.Struct, tag=True, frozen=True):
    seq: int
    known: list[str]


class Acked(msgspec.Struct, tag=True, frozen=True):
    seq: int
    known: list[str]  # held when the Ack arrived: freed now, or when the reads in flight end


class DoneReply(msgspec.Struct, tag=True, frozen=True):
    seq: int
    held: bool  # the lease still held when Done arrived: what was read is valid


class Error(msgspec.Struct, tag=True, frozen=True):
    seq: int
    code: str
    message: str


_Req = Union[Hello, Claim, Renew, Done, Ack]
_Rep = Union[HelloReply, Claimed, Renewed, DoneReply, Acked, Error]
_REQUESTS = MessageCodec(_MAGIC, RMA_WIRE_VERSION, _Req, what="kvrma request", max_body=_MAX_BODY,
                         error=LookupProtocolError, version_error=LookupProtocolError)
_REPLIES = MessageCodec(_MAGIC, RMA_WIRE_VERSION, _Rep, what="kvrma answer", max_body=_MAX_BODY,
                        error=LookupProtocolError, version_error=LookupProtocolError)


def tokens_digest(token_ids: Sequence[int]) -> str:
    """A short hash of a token sequence: the reader proves it wants the KV of exactly these tokens."""
    return hashlib.sha256(np.asarray(list(token_ids), dtype=np.int64).tobytes()).hexdigest()[:32]


# -- pieces ------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """One layer cache as RMA sees it: shape, strides (elements), element size, block dim."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    itemsize: int
    block_dim: int

    @classmethod
    def of(cls, t: torch.Tensor, block_dim: int) -> "Geometry":
        return cls(tuple(t.shape), tuple(t.stride()), t.element_size(), block_dim)

    @property
    def num_blocks(self) -> int:
        return self.shape[self.block_dim]

    def block_nbytes(self) -> int:
        """Bytes of one block (every index over the dims before and after the block dim)."""
        return int(np.prod(self.shape, dtype=np.int64)) // max(1, self.num_blocks) * self.itemsize

    def nbytes(self) -> int:
        """Bytes spanned from the tensor's start to its last element (what a registration must cover)."""
        return (sum((s - 1) * st for s, st in zip(self.shape, self.stride)) + 1) * self.itemsize


def _contiguous_tail(g: Geometry, first: int) -> bool:
    expect = 1
    for d in range(len(g.shape) - 1, first - 1, -1):
        if g.shape[d] != 1 and g.stride[d] != expect:
            return False
        expect *= g.shape[d]
    return True


def block_pieces(g: Geometry, block_ids: Sequence[int], heads: Optional[tuple[int, int]] = None,
                 head_dim: Optional[int] = None) -> tuple[np.ndarray, int]:
    """(byte offsets, bytes per piece) of ``block_ids`` in one layer cache, in (block, leading index) order.

    ``heads=(start, count)`` restricts each piece to that KV-head range of ``head_dim``,
    which must directly follow the block dim. Raises :class:`KVUsageError` for block ids
    out of range or a layout whose pieces are not contiguous.
    """
    bd = g.block_dim
    ids = np.asarray(list(block_ids), dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= g.num_blocks):
        raise KVUsageError(f"block ids out of range [0, {g.num_blocks}): {ids.min()}..{ids.max()}")
    if not _contiguous_tail(g, bd + 1):
        raise KVUsageError(f"cache of shape {g.shape} strides {g.stride}: one block is not contiguous")
    piece = int(np.prod(g.shape[bd + 1:], dtype=np.int64))
    base = np.int64(0)
    if heads is not None:
        if head_dim != bd + 1:
            raise KVUsageError(f"a KV-head range is one piece only when heads follow the block dim "
                               f"(head dim {head_dim}, block dim {bd})")
        h0, n = heads
        if h0 < 0 or n <= 0 or h0 + n > g.shape[head_dim]:
            raise KVUsageError(f"head range {h0}+{n} outside {g.shape[head_dim]} heads")
        base = np.int64(h0 * g.stride[head_dim])
        piece = n * g.stride[head_dim]
    lead = [np.int64(0)]
    for d in range(bd):  # every index over the dims before the block dim (K, V planes)
        lead = [x + i * g.stride[d] for x in lead for i in range(g.shape[d])]
    lead_arr = np.asarray(lead, dtype=np.int64)
    off = (ids[:, None] * g.stride[bd] + lead_arr[None, :] + base).reshape(-1)
    return off * g.itemsize, piece * g.itemsize


def _check_groups(group_layers: Optional[Sequence[int]], num_layers: int) -> list[int]:
    """Layers per KV cache group (default one group of all); refuses counts that do not add up."""
    groups = [num_layers] if not group_layers else [int(n) for n in group_layers]
    if any(n <= 0 for n in groups) or sum(groups) != num_layers:
        raise KVUsageError(f"KV cache groups of {groups} layers do not add up to the {num_layers} layer caches")
    return groups


def _split(items: Sequence[Any], group_layers: Sequence[int]) -> list[list[Any]]:
    out, i = [], 0
    for n in group_layers:
        out.append(list(items[i:i + n]))
        i += n
    return out


def register_layers(caches: Sequence[torch.Tensor], name: str, registered: list[Registration]) -> list[Registration]:
    """One registration per layer cache, shared by layers that are the same tensor (vLLM's hybrid
    allocator backs a layer of each KV cache group with one tensor); new ones are appended to ``registered``."""
    by_span: dict[tuple[int, int], Registration] = {}
    out = []
    for i, c in enumerate(caches):
        span = (c.data_ptr(), Geometry.of(c, 0).nbytes())
        if span not in by_span:
            by_span[span] = transport.register(c, f"{name}{i}")
            registered.append(by_span[span])
        out.append(by_span[span])
    return out


# -- producer ------------------------------------------------------------------------
@dataclass
class Lease:
    """A finished request's blocks kept for readers."""

    request_id: str
    block_ids: list[int]  # of the first KV cache group
    more_groups: list[list[int]]  # of the others
    digest: str
    num_tokens: int
    expires: float
    readers_left: Optional[int] = None  # set by the first claim
    holders: set[int] = field(default_factory=set)  # ids of pipes that claimed and are not done
    reads: int = 0  # reads completed (Done while the lease held)
    free_when_idle: bool = False  # acknowledged (or, not retained, a reader died) under another's read
    written: Optional[Any] = None  # CUDA caches: an event recorded after the kernels that wrote the blocks


class RmaKVServer:
    """Registers ``caches`` and serves their leased blocks to readers (see the module docstring).

    Args:
        caches: Per-layer paged caches (each contiguous; registered whole).
        layout: Their layout (only ``block_dim`` matters here).
        host, port: Where to listen.
        lease_s: How long an offered or claimed request stays leased without a renewal.
        on_free: Called once per offered request when its blocks may be reused.
        group_layers: Layers per KV cache group, in ``caches`` order (default: one group of all).
        retain: Keep a request's blocks after a reader's ``Done`` or death, until an ``Ack`` or the
            lease ends, so another reader can read them (decode failover).
        options: The listener's pipe options (default ``KV_PIPE_OPTIONS``); ``timeout_s`` bounds each answer.
        timeout_s, peer_timeout_s, heartbeat_s: Conveniences that override ``options`` when given.
    """

    def __init__(self, caches: Sequence[torch.Tensor], layout: PagedLayout, host: str = "127.0.0.1",
                 port: int = 0, *, lease_s: float = 30.0, on_free: Optional[Callable[[str], None]] = None,
                 retain: bool = False, group_layers: Optional[Sequence[int]] = None,
                 options: Optional[PipeOptions] = None, timeout_s: Optional[float] = None,
                 peer_timeout_s: Optional[float] = None, heartbeat_s: Optional[float] = None,
                 reap_interval_s: float = 0.1, name: Optional[str] = None):
        if not caches:
            raise KVUsageError("RmaKVServer needs at least one layer cache")
        self._group_layers = _check_groups(group_layers, len(caches))
        opts = PipeOptions.of(options or KV_PIPE_OPTIONS, timeout_s=timeout_s, peer_timeout_s=peer_timeout_s,
                              heartbeat_s=heartbeat_s)
        self.lease_s = float(lease_s)
        self.retain = bool(retain)
        self.timeout_s = float(opts.timeout_s)
        self._on_free = on_free or (lambda rid: None)
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._stop = threading.Event()
        self._regs: list[Registration] = []  # one per distinct tensor
        try:
            layer_regs = register_layers(caches, f"{name or 'kv'}-layer", self._regs)
        except BaseException:
            for r in self._regs:
                r.close()
            raise
        self._layers = [LayerInfo(r.descriptor().to_bytes(), list(c.shape), list(c.stride()), c.element_size(),
                                  str(c.dtype)) for r, c in zip(layer_regs, caches)]
        self._block_dim = layout.block_dim
        self._device = caches[0].device if caches[0].is_cuda else None
        geos = [Geometry.of(c, layout.block_dim) for c in caches]
        self._group_block_bytes = [sum(g.block_nbytes() for g in grp) for grp in _split(geos, self._group_layers)]
        self._pipes: list[Pipe] = []
        self._listener = PipeListener(host, port, name=name, service=SERVICE, options=opts)
        self.address: str = self._listener.address
        self._threads = [threading.Thread(target=self._accept_loop, daemon=True, name="kvrma-accept"),
                         threading.Thread(target=self._reap_loop, args=(reap_interval_s,), daemon=True,
                                          name="kvrma-reaper")]
        for t in self._threads:
            t.start()
        log.info("kvrma server on %s: %d registered layer caches, lease %.1fs%s", self.address, len(caches), lease_s,
                 ", retained until acknowledged" if self.retain else "")

    # -- leases
    def offer(self, request_id: str, token_ids: Sequence[int], block_ids: Sequence[int],
              more_groups: Sequence[Sequence[int]] = ()) -> None:
        """Keep ``block_ids`` (holding ``token_ids``' KV; ``more_groups``: the other KV cache groups'
        blocks, in order) for readers under a lease of ``lease_s``. On CUDA caches a reader's claim is
        answered once the work queued so far on this thread's current stream (the forward that wrote
        the blocks) has run."""
        if len(more_groups) != len(self._group_layers) - 1:
            raise KVUsageError(f"kvrma: request {request_id} offers {1 + len(more_groups)} KV cache groups' blocks, "
                               f"this server has {len(self._group_layers)} groups")
        lease = Lease(request_id, [int(b) for b in block_ids], [[int(b) for b in g] for g in more_groups],
                      tokens_digest(token_ids), len(token_ids), time.monotonic() + self.lease_s)
        if self._device is not None:
            # the engine may still be writing these blocks (its forward is queued, not finished): a
            # reader is answered only once what this thread's stream holds so far has run
            lease.written = torch.cuda.Event()
            lease.written.record(torch.cuda.current_stream(self._device))
        with self._lock:
            old = self._leases.get(request_id)
            self._leases[request_id] = lease
        if old is not None:
            log.warning("kvrma: request %s offered twice; the earlier lease is replaced", request_id)

    def release(self, request_id: str, why: str) -> bool:
        """Free a request's lease now (``on_free`` is called); False when none was held."""
        with self._lock:
            lease = self._leases.pop(request_id, None)
        if lease is None:
            return False
        log.debug("kvrma: freeing %s (%s)", request_id, why)
        self._free(lease)
        return True

    def _free(self, lease: Lease) -> None:
        try:
            self._on_free(lease.request_id)
        except Exception:  # noqa: BLE001 - the callback must not stop the server
            log.exception("kvrma: on_free(%s) failed", lease.request_id)

    @property
    def num_leases(self) -> int:
        """Requests whose blocks are held now."""
        with self._lock:
            return len(self._leases)

    @property
    def leased_bytes(self) -> int:
        """Bytes of the blocks held now, over every lease, group and layer."""
        with self._lock:
            return sum(len(ids) * nb for ls in self._leases.values()
                       for ids, nb in zip([ls.block_ids, *ls.more_groups], self._group_block_bytes))

    def _reap_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            now = time.monotonic()
            with self._lock:
                gone = [rid for rid, ls in self._leases.items() if ls.expires <= now]
                expired = [self._leases.pop(rid) for rid in gone]
            for ls in expired:
                missing = ("the reader's Done" if ls.holders else
                           f"an acknowledgement ({ls.reads} reads)" if ls.reads else "a reader")
                (log.info if ls.reads and self.retain else log.warning)(
                    "kvrma: lease of request %s expired after %.1fs without %s; its %d blocks are freed",
                    ls.request_id, self.lease_s, missing, len(ls.block_ids))
                self._free(ls)

    # -- serving
    def _accept_loop(self) -> None:
        accept_loop(self._listener, self._stop, self._lock, self._pipes, self._threads, self._serve, "kvrma")

    def _serve(self, pipe: Pipe) -> None:
        peer = pipe.peer
        try:
            while not self._stop.is_set():
                try:
                    body, _ = pipe.recv_message(timeout=1.0, max_tensors=0)
                except PeerTimeoutError:
                    continue
                except RemoteProtocolError:
                    if pipe.refused is None:
                        raise
                    body = b""  # a message carrying tensors: answered as a protocol error below
                try:
                    msg = _REQUESTS.decode(body, peer)
                except LookupProtocolError as exc:
                    log.warning("kvrma server %s: %s; closing that pipe", self.address, exc)
                    pipe.send_message(_REPLIES.encode(Error(-1, "protocol", str(exc))), timeout=self.timeout_s)
                    return
                pipe.send_message(_REPLIES.encode(self._answer(id(pipe), msg)), timeout=self.timeout_s)
        except PeerError as exc:
            log.info("kvrma server %s: reader %s gone: %s", self.address, peer, exc)
        except Exception:  # noqa: BLE001 - one reader's failure must not stop the server
            if not self._stop.is_set():
                log.exception("kvrma server %s: handler for %s failed", self.address, peer)
        finally:
            with self._lock:
                if pipe in self._pipes:
                    self._pipes.remove(pipe)
                held = [ls for ls in self._leases.values() if id(pipe) in ls.holders]
                for ls in held:  # retained: the blocks wait for another reader (or the lease's end);
                    ls.holders.discard(id(pipe))  # either way never freed under another reader's claim
                    ls.free_when_idle |= not self.retain
                dead = [self._leases.pop(ls.request_id) for ls in held if ls.free_when_idle and not ls.holders]
            for ls in held:
                log.warning("kvrma: reader %s of request %s went away mid-read; its %d blocks are %s", peer,
                            ls.request_id, len(ls.block_ids), "freed" if ls in dead else "kept (retained or read)")
            for ls in dead:
                self._free(ls)
            pipe.close()

    def _answer(self, pid: int, msg: Any) -> Any:
        if isinstance(msg, Hello):
            return HelloReply(msg.seq, self._block_dim, self._layers, list(self._group_layers))
        now = time.monotonic()
        if isinstance(msg, Renew):
            with self._lock:
                known = [rid for rid in msg.request_ids if rid in self._leases]
                for rid in known:
                    self._leases[rid].expires = max(self._leases[rid].expires, now + self.lease_s)
            return Renewed(msg.seq, known)
        if isinstance(msg, Ack):
            return Acked(msg.seq, self._acknowledge(msg.request_ids))
        if isinstance(msg, Claim):
            with self._lock:
                ls = self._leases.get(msg.request_id)
                if ls is None:
                    return Error(msg.seq, "not_found", f"no lease for request {msg.request_id!r} "
                                 "(never offered, expired, or already read)")
                if ls.digest != msg.tokens_digest or ls.num_tokens != msg.num_tokens:
                    return Error(msg.seq, "tokens", f"request {msg.request_id!r}: the reader's {msg.num_tokens} "
                                 f"tokens differ from the {ls.num_tokens} whose KV is held")
                if ls.readers_left is None:
                    ls.readers_left = max(1, int(msg.readers))
                ls.holders.add(pid)
                ls.expires = max(ls.expires, now + self.lease_s)
                written, reply = ls.written, Claimed(msg.seq, list(ls.block_ids), self.lease_s,
                                                     [list(g) for g in ls.more_groups])
            if written is not None:  # the reader GETs the blocks as soon as it has this answer
                try:
                    written.synchronize()
                except RuntimeError as exc:  # the engine's GPU work failed: its blocks hold nothing to trust
                    with self._lock:
                        ls.holders.discard(pid)
                    log.error("kvrma: the GPU work that wrote request %s's blocks failed: %s", msg.request_id, exc)
                    return Error(msg.seq, "producer_gpu", f"request {msg.request_id!r}: the kernels that wrote its "
                                 f"blocks failed on the producer's GPU: {exc}")
            return reply
        # Done
        freed = None
        with self._lock:
            ls = self._leases.get(msg.request_id)
            if ls is None or pid not in ls.holders:
                return DoneReply(msg.seq, False)
            ls.holders.discard(pid)
            ls.reads += 1
            ls.readers_left = (ls.readers_left or 1) - 1
            if ls.free_when_idle:
                last = not ls.holders
            elif self.retain:  # kept for a failover reader; the serving reader renews it
                last, ls.expires = False, max(ls.expires, now + self.lease_s)
            else:
                last = ls.readers_left <= 0
            if last:
                freed = self._leases.pop(msg.request_id)
        if freed is not None:
            self._free(freed)
        return DoneReply(msg.seq, True)

    def _acknowledge(self, request_ids: Sequence[str]) -> list[str]:
        """Free each held request now, or when the reads in flight on it end; returns those held."""
        known, freed = [], []
        with self._lock:
            for rid in request_ids:
                ls = self._leases.get(rid)
                if ls is None:
                    continue
                known.append(rid)
                if ls.holders:
                    ls.free_when_idle = True
                else:
                    freed.append(self._leases.pop(rid))
        for ls in freed:
            log.debug("kvrma: freeing %s (acknowledged after %d reads)", ls.request_id, ls.reads)
            self._free(ls)
        return known

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving, free every lease (``on_free`` for each), deregister the caches (idempotent)."""
        if not stop_serving(self._listener, self._stop, self._lock, self._pipes, self._threads, timeout):
            return
        with self._lock:
            leases, self._leases = list(self._leases.values()), {}
        for ls in leases:
            self._free(ls)
        for r in self._regs:
            r.close()
        log.info("kvrma server %s closed", self.address)


# -- consumer ------------------------------------------------------------------------
@dataclass
class RmaLoadResult:
    """What one load did: bytes moved, or the error (the caller fails every wanted block)."""

    ok: bool
    nbytes: int = 0
    error: Optional[str] = None


class RmaKVClient:
    """Reads leased blocks of one producer into this side's registered caches (one pipe; not thread-safe).

    Args:
        address: The producer's ``host:port``.
        caches: This side's per-layer caches (registered by the caller: ``registrations``).
        registrations: One registration per cache, shared by every client of this process.
        layout: Their layout.
        group_layers: Layers per KV cache group, in ``caches`` order (default: one group of all); the
            producer's must be the same.
        options: The pipe's options (default ``KV_PIPE_OPTIONS``); ``timeout_s`` bounds each exchange and the GET round.
        timeout_s, peer_timeout_s: Conveniences that override ``options`` when given.
    """

    def __init__(self, address: str, caches: Sequence[torch.Tensor], registrations: Sequence[Registration],
                 layout: PagedLayout, *, options: Optional[PipeOptions] = None, timeout_s: Optional[float] = None,
                 peer_timeout_s: Optional[float] = None, group_layers: Optional[Sequence[int]] = None):
        self.address = address
        self._group_layers = _check_groups(group_layers, len(caches))
        self.options = PipeOptions.of(options or KV_PIPE_OPTIONS, timeout_s=timeout_s, peer_timeout_s=peer_timeout_s)
        self.timeout_s = float(self.options.timeout_s)
        self._caches = list(caches)
        self._regs = list(registrations)
        self._geo = [Geometry.of(c, layout.block_dim) for c in self._caches]
        self._pipe: Optional[Pipe] = None
        self._remote: list[RemoteMemory] = []
        self._rgeo: list[Geometry] = []
        self._seq = 0

    def _connect(self) -> Pipe:
        if self._pipe is not None:
            return self._pipe
        pipe = Pipe.connect(self.address, service=SERVICE, options=self.options)
        try:
            self._pipe = pipe
            rep = self._rpc(Hello(0))
            if not isinstance(rep, HelloReply):
                raise KVTransferError(f"kvrma producer {self.address} answered Hello with {type(rep).__name__}")
            self._check_layers(rep)
            by_desc: dict[bytes, RemoteMemory] = {}  # layers sharing one producer tensor share its key
            for li in rep.layers:
                if li.descriptor not in by_desc:
                    by_desc[li.descriptor] = pipe.remote_memory(li.descriptor)
                self._remote.append(by_desc[li.descriptor])
        except BaseException:
            self.close()
            raise
        return pipe

    def _check_layers(self, rep: HelloReply) -> None:
        if len(rep.layers) != len(self._caches):
            raise KVTransferError(f"kvrma producer {self.address} has {len(rep.layers)} layer caches, "
                                  f"this side {len(self._caches)}")
        theirs = list(rep.group_layers) or [len(rep.layers)]
        if theirs != self._group_layers:
            raise KVTransferError(f"kvrma producer {self.address} has KV cache groups of {theirs} layers, "
                                  f"this side {self._group_layers}")
        self._rgeo = []
        for i, (li, c) in enumerate(zip(rep.layers, self._caches)):
            g = Geometry(tuple(li.shape), tuple(li.stride), int(li.itemsize), int(rep.block_dim))
            if li.dtype != str(c.dtype) or g.itemsize != c.element_size():
                raise KVTransferError(f"kvrma producer {self.address} layer {i}: dtype {li.dtype}, here {c.dtype}")
            if not (0 <= g.block_dim < len(g.shape)) or len(g.shape) != len(g.stride):
                raise KVTransferError(f"kvrma producer {self.address} layer {i}: malformed geometry {li.shape}")
            self._rgeo.append(g)

    def _rpc(self, msg: Any) -> Any:
        pipe = self._pipe
        assert pipe is not None
        pipe.send_message(_REQUESTS.encode(msg), timeout=self.timeout_s)
        rep = _REPLIES.decode(pipe.recv_message(timeout=self.timeout_s, max_tensors=0)[0], self.address)
        if getattr(rep, "seq", None) not in (msg.seq, -1):
            raise LookupProtocolError(f"kvrma producer {self.address} answered #{rep.seq} to #{msg.seq}")
        return rep

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def _plan(self, remote_blocks: Sequence[int], local_blocks: Sequence[int],
              heads: Optional[tuple[int, int, int]], layers: range) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """Per layer of ``layers``: (local offsets, remote offsets, piece bytes)."""
        plans = []
        for g, rg in zip(self._geo[layers.start:layers.stop], self._rgeo[layers.start:layers.stop]):
            hd = g.block_dim + 1
            if heads is None:
                lo, ln = block_pieces(g, local_blocks)
                ro, rn = block_pieces(rg, remote_blocks)
            else:
                src, n, dst = heads
                lo, ln = block_pieces(g, local_blocks, (dst, n), hd)
                ro, rn = block_pieces(rg, remote_blocks, (src, n), hd)
            if ln != rn or lo.size != ro.size:
                raise KVTransferError(f"kvrma producer {self.address}: its blocks are {rn}-byte pieces "
                                      f"({ro.size}), this side's {ln} ({lo.size}): cache shapes differ")
            plans.append((lo, ro, ln))
        return plans

    def load(self, request_id: str, token_ids: Sequence[int], local_blocks: Sequence[int], skip_blocks: int = 0,
             *, heads: Optional[tuple[int, int, int]] = None, readers: int = 1,
             after_claim: Optional[Callable[[], None]] = None,
             more_groups: Sequence[tuple[Sequence[int], int]] = ()) -> RmaLoadResult:
        """GET request ``request_id``'s blocks ``skip_blocks..`` into ``local_blocks[skip_blocks:]``.

        ``more_groups``: ``(local_blocks, skip_blocks)`` of each other KV cache group, in order;
        each group's blocks pair up by position with the producer's list of that group.

        ``heads=(src_head, count, dst_head)`` reads a KV-head range of each block
        (tensor parallelism); ``readers`` is how many loads share the lease; ``after_claim``
        (testing only) runs once the lease is bound to this pipe, before any GET. Never
        raises for a transfer problem: the result says what went wrong (the pipe is
        dropped and redialled on the next load after a transport error).
        """
        try:
            self._connect()
            rep = self._rpc(Claim(self._next(), request_id, tokens_digest(token_ids), len(token_ids), readers))
            if isinstance(rep, Error):
                return RmaLoadResult(False, error=f"{rep.code}: {rep.message}")
            if not isinstance(rep, Claimed):
                raise LookupProtocolError(f"kvrma producer {self.address} answered Claim with {type(rep).__name__}")
            items = self._items(request_id, rep, [(local_blocks, skip_blocks), *more_groups], heads)
            if after_claim is not None:
                after_claim()
            nbytes = transport.transfer_many(items, timeout=self.timeout_s) if items else 0
            done = self._rpc(Done(self._next(), request_id))
            if not isinstance(done, DoneReply) or not done.held:
                return RmaLoadResult(False, error=f"the lease of {request_id} at {self.address} ended before the "
                                                  "read completed (the blocks may have been reused)")
            return RmaLoadResult(True, nbytes)
        except (KVTransferError, KVUsageError, LookupProtocolError, transport.TransportError) as exc:
            self.close()
            return RmaLoadResult(False, error=f"{type(exc).__name__}: {exc}")

    def _items(self, request_id: str, rep: Claimed, groups: Sequence[tuple[Sequence[int], int]],
               heads: Optional[tuple[int, int, int]]) -> list[tuple]:
        """The GET items (one per layer with blocks to read) for each group's local blocks from skip on."""
        theirs = [rep.block_ids, *rep.more_groups]
        if len(theirs) != len(groups):
            raise KVTransferError(f"kvrma producer {self.address} holds {len(theirs)} KV cache groups' blocks of "
                                  f"{request_id}, {len(groups)} wanted")
        items, first = [], 0
        for pos, ((local, skip), remote, n) in enumerate(zip(groups, theirs, self._group_layers)):
            layers, first = range(first, first + n), first + n
            if len(remote) < len(local):
                raise KVTransferError(f"kvrma producer {self.address} holds {len(remote)} blocks of {request_id}"
                                      f"{f' (KV cache group {pos})' if pos else ''}, {len(local)} wanted")
            if not list(local)[skip:]:
                continue
            plans = self._plan(remote[skip:len(local)], list(local)[skip:], heads, layers)
            items += [(self._remote[i], self._regs[i], lo, ro, ln) for i, (lo, ro, ln) in zip(layers, plans)]
        return items

    def renew(self, request_ids: Sequence[str]) -> list[str]:
        """Extend the leases of ``request_ids``; returns those the producer still holds."""
        return self._ids_rpc(Renew, Renewed, request_ids)

    def ack(self, request_ids: Sequence[str]) -> list[str]:
        """Tell the producer these requests were answered in full (their retained blocks may go, once
        no other reader is reading them); returns those it still held."""
        return self._ids_rpc(Ack, Acked, request_ids)

    def _ids_rpc(self, kind: type, answer: type, request_ids: Sequence[str]) -> list[str]:
        try:
            self._connect()
            rep = self._rpc(kind(self._next(), list(request_ids)))
            if not isinstance(rep, answer):
                raise LookupProtocolError(f"kvrma producer {self.address} answered {kind.__name__} with "
                                          f"{type(rep).__name__}")
        except BaseException:
            self.close()  # the next call redials
            raise
        return list(rep.known)

    def close(self) -> None:
        """Release the remote keys and the pipe (idempotent; the next load redials)."""
        remote, self._remote = self._remote, []
        for rm in remote:
            rm.close()
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            pipe.close()
