"""One-sided RMA: register memory once, let a peer GET from it / PUT into it without a receive.

Why one file of ~610 lines: the owner's registration, the descriptor and the
reader's remote memory share the liveness status page and its token protocol;
neither half means anything without the other.

Owner side: :func:`register` maps a tensor or buffer with UCX (``ucp_mem_map``)
and :meth:`Registration.descriptor` exports a small, versioned
:class:`MemoryDescriptor` (address, length, packed remote key) to send to a
peer over any control channel. Reader side: :meth:`Pipe.remote_memory` unpacks
it on the pipe's UCX endpoint and :meth:`RemoteMemory.get` / :meth:`RemoteMemory.put`
move many ``(local offset, remote offset, length)`` pieces in one call between
a local :class:`Registration` and the remote one.

Promises:

- Pieces are bounds-checked against both registrations before anything is
  posted; contiguous runs are coalesced and posted in bulk by a compiled helper
  (no Python per piece).
- A descriptor whose registration was closed is refused with
  :class:`StaleMemoryError`, and a registration closed *during* a transfer
  fails that transfer with it: every registration has a liveness word in a
  process-wide status page that the reader reads before posting and again
  after completion. The owner must still keep memory it let a peer read
  mapped until the peer is done (a lease); the check guarantees only that data
  read after revocation is never returned as valid.
- Every wait has a deadline and names the peer; a timeout or a dead peer
  breaks the pipe (cancelling what is in flight) exactly like a tensor transfer.
- Native resources have one owner: a :class:`Registration` owns its memory
  handle and packed key; a :class:`RemoteMemory` owns its unpacked keys, freed
  on :meth:`RemoteMemory.close` or when its pipe's endpoint closes (close,
  peer death). All closes are idempotent.

Transports without hardware RMA (tcp, shared memory without cma) emulate GET
and PUT with active messages served by the owner's worker: the engine's
progress thread (which sleeps on the worker's event fd) serves them, so no
thread of its own is needed here.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import secrets
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Sequence

import msgspec
import numpy as np
import torch

from . import _cuda_order, _ucp_rma
from ._envelope import MessageCodec
from ._engine import Engine, Op, get_engine
from .errors import LocalUsageError, PeerDeadError, RemoteProtocolError, TransportError

if TYPE_CHECKING:
    from .pipe import Pipe

log = logging.getLogger(__name__)

__all__ = ["MemoryDescriptor", "Registration", "RemoteMemory", "StaleMemoryError", "register", "transfer_many"]

#: Version of the descriptor encoding; a peer with another one is refused by name.
#: (1: its bytes are unchanged since it moved onto transport's MessageCodec: magic, u16 1, u16 0.)
DESCRIPTOR_VERSION = 1
_MAGIC = b"UKVM"
MAX_DESCRIPTOR_BYTES = 16 * 1024
_MAX_LEN = 1 << 62
#: Bytes posted per round (then one flush) where GET may be emulated by the owner (tcp, posix/sysv):
#: with :data:`DEFAULT_WINDOWS_IN_FLIGHT` rounds unflushed at once, bounds what the owner has
#: queued for us to 4 MiB, because UCX 1.21 crashes an owner whose emulated GET replies are still
#: queued when its reader dies (tests/test_rma.py::test_rma_reader_killed_mid_get[tcp]: 12 of 12
#: passed at 2 MiB x 2; at 4 MiB x 2 the owner crashed in 3 of 9; docs/bench.md).
#: ``UCXKV_RMA_WINDOW_BYTES`` overrides (0: no windows).
DEFAULT_WINDOW_BYTES = 2 << 20


def window_bytes(engine: Engine) -> int:
    """The RMA window for this engine's transports: none when shared memory with cma (zero-copy
    reads, nothing queued at the owner) is the only choice, else :data:`DEFAULT_WINDOW_BYTES`."""
    env = os.environ.get("UCXKV_RMA_WINDOW_BYTES")
    if env is not None:
        return int(env)
    cached = getattr(engine, "_rma_window", None)
    if cached is None:
        names = {n.strip() for n in str(engine.context.config.get("TLS", "all")).split(",")}
        emulated = names & {"tcp", "all"} or not names & {"cma", "sm", "shm"} or any(n.startswith("^") for n in names)
        cached = engine._rma_window = DEFAULT_WINDOW_BYTES if emulated else 0
    return cached
#: How many windows may be posted and not yet flushed at once (``UCXKV_RMA_WINDOWS_IN_FLIGHT``):
#: 2 keeps the emulated-GET pipeline from draining at every flush (1 did, 64 times a request).
DEFAULT_WINDOWS_IN_FLIGHT = 2


def windows_in_flight() -> int:
    """Windows posted ahead of the oldest unfinished flush (at least 1: 1 drains after every window)."""
    return max(1, int(os.environ.get("UCXKV_RMA_WINDOWS_IN_FLIGHT", DEFAULT_WINDOWS_IN_FLIGHT)))


_STATUS_SLOTS = 4096


class StaleMemoryError(TransportError):
    """The remote registration was closed (deregistered) before or during the transfer."""


class MemoryDescriptor(msgspec.Struct, tag=True, frozen=True):
    """What a peer needs to reach a registration: where it is, how long, and its packed remote key."""

    owner: str
    address: int
    nbytes: int
    rkey: bytes
    memory: str
    status_address: int
    status_rkey: bytes
    token: int

    def to_bytes(self) -> bytes:
        """The descriptor as bytes for a control channel (a :class:`MessageCodec` message)."""
        return _CODEC.encode(self)

    @classmethod
    def from_bytes(cls, data: bytes, peer: str) -> "MemoryDescriptor":
        """Decode and validate bytes received from ``peer``; any malformed input raises :class:`RemoteProtocolError`."""
        if len(data) > MAX_DESCRIPTOR_BYTES:
            raise RemoteProtocolError(f"memory descriptor from {peer}: {len(data)} bytes, at most {MAX_DESCRIPTOR_BYTES}")
        d = _CODEC.decode(data, peer)
        bad = d._problem()
        if bad:
            raise RemoteProtocolError(f"memory descriptor from {peer}: {bad}")
        return d

    def _problem(self) -> str | None:
        if not (0 < self.address < 1 << 64) or not (0 < self.status_address < 1 << 64):
            return "address out of range"
        if not (0 < self.nbytes <= _MAX_LEN) or self.address + self.nbytes > 1 << 64:
            return f"length {self.nbytes} out of range"
        if not self.rkey or not self.status_rkey:
            return "empty remote key"
        if self.memory not in ("host", "cuda"):
            return f"unknown memory type {self.memory!r}"
        if not (0 < self.token < 1 << 63):
            return "bad liveness token"
        return None


_CODEC = MessageCodec(_MAGIC, DESCRIPTOR_VERSION, MemoryDescriptor, what="memory descriptor",
                      max_body=MAX_DESCRIPTOR_BYTES, error=RemoteProtocolError, version_error=RemoteProtocolError)


# -- owner side ----------------------------------------------------------------
def _check(status: int, what: str) -> None:
    if status != 0:
        raise TransportError(f"{what}: {_ucp_rma.status_string(status)}")


class _Mapped:
    """A ``ucp_mem_map`` of [addr, addr+nbytes) and its packed remote key (one owner, idempotent release)."""

    def __init__(self, engine: Engine, addr: int, nbytes: int, what: str):
        lib = _ucp_rma.lib()
        self._engine = engine
        self.memh = ctypes.c_void_p()
        buf, size = ctypes.c_void_p(), ctypes.c_size_t()
        with engine._lock:
            _check(lib.ukv_mem_map(engine.context.handle, addr, nbytes, ctypes.byref(self.memh)), f"registering {what}")
            try:
                _check(lib.ukv_rkey_pack(engine.context.handle, self.memh, ctypes.byref(buf), ctypes.byref(size)),
                       f"packing the remote key of {what}")
                self.rkey = ctypes.string_at(buf, size.value)
                lib.ukv_rkey_buffer_release(buf)
            except BaseException:
                lib.ukv_mem_unmap(engine.context.handle, self.memh)
                raise
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        with self._engine._lock:
            _ucp_rma.lib().ukv_mem_unmap(self._engine.context.handle, self.memh)


class _StatusPages:
    """Process-wide liveness words: a registration is live while its slot holds its token."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pages: list[tuple[np.ndarray, _Mapped]] = []
        self._free: list[tuple[int, int]] = []
        self._engine: Engine | None = None

    def take(self, engine: Engine) -> tuple[np.ndarray, int, _Mapped, tuple[int, int]]:
        with self._lock:
            if self._engine is not engine:  # a new engine (fork): old pages belong to the parent
                self._pages, self._free, self._engine = [], [], engine
            if not self._free:
                words = np.zeros(_STATUS_SLOTS, dtype=np.uint64)
                mapped = _Mapped(engine, words.ctypes.data, words.nbytes, "the RMA status page")
                self._pages.append((words, mapped))
                p = len(self._pages) - 1
                self._free = [(p, i) for i in range(_STATUS_SLOTS - 1, -1, -1)]
            p, i = self._free.pop()
            words, mapped = self._pages[p]
            return words, i, mapped, (p, i)

    def give_back(self, engine: Engine, slot: tuple[int, int]) -> None:
        with self._lock:
            if self._engine is engine:
                self._free.append(slot)


    def release_all(self) -> None:
        """Deregister the pages (at exit, before UCX's context goes away)."""
        with self._lock:
            for words, mapped in self._pages:
                words[:] = 0
                mapped.release()
            self._pages, self._free = [], []


_status = _StatusPages()
atexit.register(_status.release_all)




def _buffer_span(obj: Any) -> tuple[int, int, str, bool, Any]:
    """(address, nbytes, memory type, writable, object to keep alive) of a contiguous tensor or buffer."""
    if isinstance(obj, torch.Tensor):
        t = obj
    elif isinstance(obj, np.ndarray) or hasattr(obj, "__cuda_array_interface__") or hasattr(obj, "__dlpack__"):
        if isinstance(obj, np.ndarray) and not obj.flags.writeable:
            if not obj.flags.c_contiguous:
                raise LocalUsageError("register() needs contiguous memory")
            return obj.ctypes.data, obj.nbytes, "host", False, obj
        from ._envelope import as_torch

        t = as_torch(obj)
    else:
        try:
            mv = memoryview(obj)
        except TypeError:
            raise LocalUsageError(f"cannot register an object of type {type(obj).__name__}: expected a tensor, "
                                  "an array or a buffer") from None
        if not mv.c_contiguous:
            raise LocalUsageError("register() needs contiguous memory")
        arr = np.frombuffer(mv, dtype=np.uint8) if mv.nbytes else np.empty(0, np.uint8)
        return arr.ctypes.data, arr.nbytes, "host", not mv.readonly, (obj, arr)
    if not t.is_contiguous():
        raise LocalUsageError("register() needs a contiguous tensor (register its storage's base tensor instead)")
    if t.device.type not in ("cpu", "cuda"):
        raise LocalUsageError(f"cannot register memory on device {t.device}")
    return t.data_ptr(), t.numel() * t.element_size(), "host" if t.device.type == "cpu" else "cuda", True, t


class Registration:
    """Memory registered with UCX for one-sided access. Build with :func:`register`.

    Keeps the tensor or buffer alive while registered. ``close()`` revokes every
    descriptor exported from it (readers get :class:`StaleMemoryError`) and
    deregisters; it is idempotent.
    """

    def __init__(self, obj: Any, name: str | None = None):
        addr, nbytes, memory, writable, keep = _buffer_span(obj)
        if nbytes <= 0:
            raise LocalUsageError("cannot register an empty buffer")
        self._engine = get_engine()
        self.name = name or f"registration@{addr:#x}"
        self.address, self.nbytes, self.memory, self.writable = addr, nbytes, memory, writable
        #: The CUDA device of the memory, None for host memory.
        self.device: torch.device | None = keep.device if memory == "cuda" else None
        self._keep = keep
        self._mapped = _Mapped(self._engine, addr, nbytes, self.name)
        try:
            self._words, self._slot_index, self._status, self._slot = _status.take(self._engine)
        except BaseException:
            self._mapped.release()
            raise
        self.token = secrets.randbits(62) | 1
        self._words[self._slot_index] = self.token
        self._closed = False
        self._engine.serve(+1)  # peers' emulated GET/PUT need our worker progressed
        self._finalizer = weakref.finalize(self, Registration._release, self._engine, self._mapped, self._words,
                                           self._slot_index, self._slot)
        log.debug("registered %s: %d bytes of %s memory at %#x", self.name, nbytes, memory, addr)

    @staticmethod
    def _release(engine: Engine, mapped: _Mapped, words: np.ndarray, index: int, slot: tuple[int, int]) -> None:
        words[index] = 0  # revoke first: a reader's liveness check fails from here on
        mapped.release()
        _status.give_back(engine, slot)
        engine.serve(-1)

    @property
    def closed(self) -> bool:
        return self._closed

    def descriptor(self, owner: str | None = None) -> MemoryDescriptor:
        """The descriptor a peer needs to GET from / PUT into this registration."""
        if self._closed:
            raise LocalUsageError(f"{self.name} is closed")
        return MemoryDescriptor(owner=owner or self.name, address=self.address, nbytes=self.nbytes,
                                rkey=self._mapped.rkey, memory=self.memory,
                                status_address=int(self._words.ctypes.data) + 8 * self._slot_index,
                                status_rkey=self._status.rkey, token=self.token)

    def close(self) -> None:
        """Revoke exported descriptors and deregister (idempotent). The memory itself stays the caller's."""
        if not self._closed:
            self._closed = True
            self._finalizer()
            self._keep = None

    def __enter__(self) -> "Registration":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Registration {self.name} {self.nbytes} bytes {self.memory}{' closed' if self._closed else ''}>"


def register(obj: Any, name: str | None = None) -> Registration:
    """Register a contiguous tensor (CPU or CUDA), numpy array or buffer for one-sided access.

    Register few, large regions (a whole KV cache tensor), not many small ones:
    registration is slow, access to any part of a registration is free.
    """
    return Registration(obj, name)


# -- reader side ----------------------------------------------------------------
class _Flush:
    """An ``ucp_ep_flush_nbx`` request, shaped like a ucxx request for :class:`Op` (one owner)."""

    def __init__(self, req: int | None, status: int, what: str):
        self._req, self._status, self._what = req, status, what

    @classmethod
    def post(cls, ep_handle: int, what: str) -> "_Flush":
        """Post a flush of the endpoint ``ep_handle`` (the engine's lock held): done at once if
        nothing was in flight, failed if the endpoint has failed."""
        req = ctypes.c_void_p()
        rc = _ucp_rma.lib().ukv_flush(ep_handle, ctypes.byref(req))
        return cls(req.value if rc == 1 else None, rc if rc < 0 else 0, what)

    @property
    def pending(self) -> bool:
        """Whether the flush was still in flight when last looked at (UCX owns a request for it)."""
        return self._req is not None

    @property
    def completed(self) -> bool:
        if self._req is not None:
            s = _ucp_rma.lib().ukv_request_status(self._req)
            if s == 1:
                return False
            self._status = s
            self.release()
        return True

    def check_error(self) -> None:
        if self._status < 0:  # the endpoint failed: the peer is gone or unreachable
            raise PeerDeadError(f"{self._what}: {_ucp_rma.status_string(self._status)}")

    def release(self) -> None:
        if self._req is not None:
            _ucp_rma.lib().ukv_request_free(self._req)  # completes inside UCX if still running
            self._req = None


def _as_offsets(x: Any, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "iu" and a.size:
        raise LocalUsageError(f"{what} must be integers, got {a.dtype}")
    if a.dtype.kind == "u" and a.size and int(a.max()) >= _MAX_LEN:
        raise LocalUsageError(f"{what} out of range")
    return a.astype(np.int64, copy=False).reshape(-1)


def plan_pieces(local_offsets: Any, remote_offsets: Any, lengths: Any, local_nbytes: int, remote_nbytes: int,
                what: str = "pieces") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate pieces and coalesce contiguous runs; returns (local, remote, length) int64 arrays.

    ``lengths`` may be one integer for all pieces. Raises :class:`LocalUsageError`
    naming the first piece outside either range.
    """
    lo = _as_offsets(local_offsets, "local offsets")
    ro = _as_offsets(remote_offsets, "remote offsets")
    ln = _as_offsets(lengths, "lengths")
    if ln.size == 1 and lo.size != 1:
        ln = np.full(lo.size, ln[0], dtype=np.int64)
    if not (lo.size == ro.size == ln.size):
        raise LocalUsageError(f"{what}: {lo.size} local offsets, {ro.size} remote offsets, {ln.size} lengths")
    for arr, name in ((lo, "local offset"), (ro, "remote offset"), (ln, "length")):
        neg = np.flatnonzero(arr < 0)
        if neg.size:
            raise LocalUsageError(f"{what}: piece {neg[0]} has negative {name} {arr[neg[0]]}")
    for off, limit, side in ((lo, local_nbytes, "local"), (ro, remote_nbytes, "remote")):
        over = np.flatnonzero((off > limit) | (ln > limit - np.minimum(off, limit)))
        if over.size:
            i = over[0]
            raise LocalUsageError(f"{what}: piece {i} [{off[i]}, {off[i] + ln[i]}) is outside the {side} "
                                  f"registration of {limit} bytes")
    keep = ln > 0
    lo, ro, ln = lo[keep], ro[keep], ln[keep]
    if lo.size <= 1:
        return lo, ro, ln
    order = np.argsort(ro, kind="stable")
    lo, ro, ln = lo[order], ro[order], ln[order]
    brk = np.empty(lo.size, dtype=bool)
    brk[0] = True
    brk[1:] = (ro[:-1] + ln[:-1] != ro[1:]) | (lo[:-1] + ln[:-1] != lo[1:])
    starts = np.flatnonzero(brk)
    return lo[starts], ro[starts], np.add.reduceat(ln, starts)


class RemoteMemory:
    """A peer's registration, reached over a :class:`Pipe`'s UCX endpoint. Build with :meth:`Pipe.remote_memory`."""

    def __init__(self, pipe: "Pipe", descriptor: MemoryDescriptor | bytes):
        pipe._ready()
        if isinstance(descriptor, (bytes, bytearray, memoryview)):
            descriptor = MemoryDescriptor.from_bytes(bytes(descriptor), pipe.peer)
        elif not isinstance(descriptor, MemoryDescriptor):
            raise LocalUsageError(f"expected a MemoryDescriptor or its bytes, got {type(descriptor).__name__}")
        else:
            bad = descriptor._problem()
            if bad:
                raise LocalUsageError(f"memory descriptor: {bad}")
        self.pipe, self.descriptor = pipe, descriptor
        self.nbytes = descriptor.nbytes
        self._engine: Engine = pipe._engine
        self._lock = threading.Lock()  # one transfer at a time (they share the liveness word buffer)
        self._rkeys: list[ctypes.c_void_p] = []
        self._closed = False
        lib = _ucp_rma.lib()
        with self._engine._lock:
            if pipe._ep_closed:
                raise PeerDeadError(f"pipe {pipe.name} to {pipe.peer} has no endpoint (closed or broken)")
            for packed in (descriptor.rkey, descriptor.status_rkey):
                rk = ctypes.c_void_p()
                status = lib.ukv_rkey_unpack(pipe._ep.handle, packed, ctypes.byref(rk))
                if status != 0:
                    self._destroy_rkeys()
                    raise RemoteProtocolError(f"remote key from {pipe.peer} ({descriptor.owner}) does not unpack: "
                                              f"{_ucp_rma.status_string(status)}")
                self._rkeys.append(rk)
            pipe._ep_users.append(self._on_ep_closed)

    @property
    def peer(self) -> str:
        return self.pipe.peer

    def _destroy_rkeys(self) -> None:
        lib = _ucp_rma.lib()
        for rk in self._rkeys:
            lib.ukv_rkey_destroy(rk)
        self._rkeys = []

    def _on_ep_closed(self) -> None:
        """Called by the pipe (engine lock held) right after its endpoint closed: in-flight ops are gone."""
        self._closed = True
        self._destroy_rkeys()

    def close(self) -> None:
        """Release the unpacked remote keys (idempotent). Never blocks on the peer."""
        with self._lock, self._engine._lock:
            if not self._closed:
                self._closed = True
                self._destroy_rkeys()
                try:
                    self.pipe._ep_users.remove(self._on_ep_closed)
                except ValueError:
                    pass

    def __enter__(self) -> "RemoteMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transfers ---------------------------------------------------------
    def get(self, local: Registration, local_offsets: Any, remote_offsets: Any, lengths: Any,
            timeout: float | None = None) -> int:
        """Copy remote pieces into ``local``: ``local[lo:lo+n] = remote[ro:ro+n]`` for each piece.

        Returns the number of bytes moved once all landed. Raises
        :class:`LocalUsageError` for a piece outside either registration (nothing
        posted), :class:`StaleMemoryError` if the remote registration was closed
        before or during the transfer, :class:`PeerTimeoutError` /
        :class:`PeerDeadError` (naming the peer) if it does not complete in time.
        Destination pieces must not overlap. See :func:`transfer_many` for several
        regions in one call.
        """
        return transfer_many([(self, local, local_offsets, remote_offsets, lengths)], put=False, timeout=timeout)

    def put(self, local: Registration, local_offsets: Any, remote_offsets: Any, lengths: Any,
            timeout: float | None = None) -> int:
        """Copy local pieces into the remote registration; returns once they are visible there.

        Same checks and errors as :meth:`get`.
        """
        return transfer_many([(self, local, local_offsets, remote_offsets, lengths)], put=True, timeout=timeout)

    def _check_usable(self) -> None:
        if self._closed:
            raise LocalUsageError(f"remote memory {self.descriptor.owner} at {self.peer} is closed "
                                  "(or its pipe's endpoint was)")

    def __repr__(self) -> str:
        return f"<RemoteMemory {self.descriptor.owner} {self.nbytes} bytes at {self.peer}{' closed' if self._closed else ''}>"


_I64P = ctypes.POINTER(ctypes.c_int64)


def transfer_many(items: Sequence[tuple[RemoteMemory, Registration, Any, Any, Any]], *, put: bool = False,
                  timeout: float | None = None) -> int:
    """GET (or PUT) pieces of several remote regions reached over the *same* pipe, in one round.

    Each item is ``(remote, local, local_offsets, remote_offsets, lengths)`` as for
    :meth:`RemoteMemory.get`. Everything is validated before anything is posted;
    then one liveness check of all remote regions, all pieces, one flush, and a
    second liveness check: three round trips for the whole batch. Returns the
    bytes moved; errors as :meth:`RemoteMemory.get`.
    """
    if not items:
        return 0
    verb = "PUT into" if put else "GET from"
    pipe = items[0][0].pipe
    plans = []
    for rm, local, lo, ro, ln in items:
        if not isinstance(rm, RemoteMemory) or rm.pipe is not pipe:
            raise LocalUsageError("transfer_many needs RemoteMemory objects of one pipe")
        if not isinstance(local, Registration):
            raise LocalUsageError(f"the local side of an RMA {verb} must be a Registration (see transport.register)")
        if local.closed:
            raise LocalUsageError(f"local {local.name} is closed")
        if not put and not local.writable:
            raise LocalUsageError(f"local {local.name} is read-only; cannot GET into it")
        plans.append((rm, local) + plan_pieces(lo, ro, ln, local.nbytes, rm.nbytes, f"RMA {verb} {rm.descriptor.owner}"))
    total = sum(int(p[4].sum()) for p in plans)
    npieces = sum(int(p[4].size) for p in plans)
    owners = sorted({p[0].descriptor.owner for p in plans})
    what = (f"RMA {verb} {', '.join(owners[:3])}{' ...' if len(owners) > 3 else ''} at {pipe.peer} "
            f"({total} bytes in {npieces} pieces)")
    remotes = sorted({id(p[0]): p[0] for p in plans}.values(), key=id)
    for rm in remotes:
        rm._lock.acquire()
    try:
        pipe._ready()
        for rm in remotes:
            rm._check_usable()
        deadline = time.monotonic() + (pipe.timeout_s if timeout is None else timeout)
        _check_live(pipe, remotes, deadline, what, "before")
        # a PUT reads, a GET writes our device memory off the caller's stream: what it queued runs first
        _cuda_order.settle(p[1].device for p in plans)
        _post_windows(pipe, put, _windows(plans, window_bytes(pipe._engine)), deadline, what)
        _check_live(pipe, remotes, deadline, what, "during")
    finally:
        for rm in remotes:
            rm._lock.release()
    return total


def _windows(plans: list[tuple], limit: int) -> list[list[tuple]]:
    """Split plans into rounds of at most ``limit`` bytes (a piece larger than that is split too)."""
    if limit <= 0:
        return [plans]
    out: list[list[tuple]] = []
    for rm, local, lo, ro, ln in plans:
        if ln.size and int(ln.max()) > limit:  # split long runs into limit-sized pieces
            counts = -(-ln // limit)
            idx = np.repeat(np.arange(ln.size), counts)
            within = np.arange(idx.size) - np.repeat(np.cumsum(counts) - counts, counts)
            step = within * limit
            lo, ro = lo[idx] + step, ro[idx] + step
            ln = np.minimum(ln[idx] - step, limit)
        ends = np.cumsum(ln)
        cuts = np.searchsorted(ends, np.arange(limit, int(ends[-1]) if ends.size else 0, limit), side="right")
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, ln.size]):
            if b > a:
                out.append([(rm, local, lo[a:b], ro[a:b], ln[a:b])])
    return out


def _check_live(pipe: "Pipe", remotes: list[RemoteMemory], deadline: float, what: str, when: str) -> None:
    words = np.zeros(len(remotes), dtype=np.uint64)
    zero, eight = np.zeros(1, dtype=np.int64), np.full(1, 8, dtype=np.int64)
    plans = [(rm, None, zero + 8 * i, zero, eight) for i, rm in enumerate(remotes)]
    _post_and_flush(pipe, False, plans, deadline, what + " (liveness check)", status_words=words)
    for rm, word in zip(remotes, words.tolist()):
        if word != rm.descriptor.token:
            raise StaleMemoryError(f"{what}: the remote registration {rm.descriptor.owner} was closed {when} "
                                   "the transfer (stale descriptor)")


def _post_windows(pipe: "Pipe", put: bool, windows: list[list[tuple]], deadline: float, what: str) -> None:
    """Post the windows in order with up to :func:`windows_in_flight` of them unflushed at once.

    Each window ends with its own flush; the next window is posted before the oldest flush is
    waited for, so the emulated-GET pipeline never drains between windows while what the owner
    has queued for us stays bounded by ``window x in-flight`` bytes.
    """
    depth = windows_in_flight()
    pending: list[tuple[_Flush, list[tuple]]] = []
    try:
        for window in windows:
            pending.append((_post(pipe, put, window, what), window))
            if len(pending) >= depth:
                _wait_flush(pipe, *pending.pop(0), deadline, what)
        while pending:
            _wait_flush(pipe, *pending.pop(0), deadline, what)
    finally:
        if pending:  # a wait failed (the pipe is broken): hand the other flushes back to UCX
            with pipe._engine._lock:
                for flush, _ in pending:
                    flush.release()


def _post_and_flush(pipe: "Pipe", put: bool, plans: list[tuple], deadline: float, what: str,
                    status_words: np.ndarray | None = None) -> None:
    """Post every plan's pieces, then one endpoint flush, and wait for it (engine lock only while posting)."""
    _wait_flush(pipe, _post(pipe, put, plans, what, status_words), [plans, status_words], deadline, what)


def _wait_flush(pipe: "Pipe", flush: _Flush, keep: Any, deadline: float, what: str) -> None:
    try:
        pipe._wait_ops([Op([flush], [keep], stream=True)], deadline, what)
    finally:
        with pipe._engine._lock:
            flush.release()


def _post(pipe: "Pipe", put: bool, plans: list[tuple], what: str,
          status_words: np.ndarray | None = None) -> _Flush:
    """Post every plan's pieces, then one endpoint flush (not waited for; the caller owns it)."""
    lib = _ucp_rma.lib()
    engine: Engine = pipe._engine
    posted = ctypes.c_size_t()
    rc = 0
    with engine._lock:
        pipe._check_usable()  # broken mid-transfer (peer death, timeout): the peer's error, not ours
        for rm, *_ in plans:
            rm._check_usable()
        ep = pipe._ep.handle
        for rm, local, lo, ro, ln in plans:
            if not lo.size:
                continue
            if status_words is not None:
                rbase, rkey, lbase, lmemh = rm.descriptor.status_address, rm._rkeys[1], status_words.ctypes.data, None
            else:
                rbase, rkey, lbase, lmemh = rm.descriptor.address, rm._rkeys[0], local.address, local._mapped.memh
            rc = lib.ukv_post(ep, int(put), lbase, lmemh, rbase, rkey, lo.size, lo.ctypes.data_as(_I64P),
                              ro.ctypes.data_as(_I64P), ln.ctypes.data_as(_I64P), ctypes.byref(posted))
            if rc != 0:
                break
        flush = _Flush.post(ep, what)
    if rc != 0:
        with engine._lock:
            flush.release()
        pipe._fail(PeerDeadError(f"{what}: posting failed: {_ucp_rma.status_string(rc)}"), what)
    return flush
