"""The LookupBuffer: a bounded, leased store of KV entries with SQL-like access.

``insert`` adds an entry (input tokens, a region-of-interest mask, key, value,
hidden); ``drop_select`` returns the entry whose masked tokens match a query and
removes it. This module has three pieces:

* :class:`LookupBuffer` - the store itself, pure logic and usable in-process:
  byte capacity with back-pressure, leases (TTL) after which unclaimed entries
  are dropped, exact or longest-prefix matching, ``request_id`` scoping, abort.
* :class:`LookupServer` - serves a buffer to remote consumers: a
  :class:`transport.PipeListener` and one handler thread per consumer pipe.
  A match is answered with the stored tensors themselves (zero copy).
* :class:`LookupClient` (one producer) and :class:`MultiProducerClient` (several
  producers, xPyD) - the consumer side, with the same ``fetch``/``drop_select``
  signature as the buffer, so callers do not care where the buffer lives.

Matching: a query's masked tokens (``tokens[roi]``, all tokens when ``roi`` is
None) are compared with each entry's masked tokens. An entry is only reachable
through its exact token content and/or its ``request_id``; with ``prefix=True``
the entry sharing the longest token prefix (at least ``min_prefix``) matches
and :attr:`Match.matched` says how many tokens it shares.

Entry lifecycle: *available* -> *claimed* (invisible to other queries while it
is being sent) -> released (bytes freed). A failed send puts the entry back as
available; leases only expire available entries (a claimed entry's memory is
in use by the transport until its send ends). ``abort(request_id)`` drops the
available entries of a request and marks its claimed ones to be dropped when
their send ends.

Inserted tensors are stored by reference, not copied: do not modify them after
``insert``.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from . import _lookup_wire as wire
from .errors import (
    BufferFullError,
    EntryTooLargeError,
    KVTransferError,
    KVUsageError,
    LookupProtocolError,
    PeerUnavailableError,
    ProducerError,
    WireVersionError,
)

log = logging.getLogger(__name__)

__all__ = ["LookupBuffer", "Match", "LookupServer", "LookupClient", "MultiProducerClient", "Part"]

#: One of an entry's key / value / hidden: None, a tensor, or a list of tensors (e.g. per layer).
Part = wire.Part

DEFAULT_LEASE_S = 60.0
DEFAULT_INSERT_TIMEOUT_S = 30.0


def _part_nbytes(part: Part, what: str) -> int:
    if part is None:
        return 0
    if isinstance(part, torch.Tensor):
        return part.numel() * part.element_size()
    if isinstance(part, (list, tuple)):
        total = 0
        for i, t in enumerate(part):
            if not isinstance(t, torch.Tensor):
                raise KVUsageError(f"{what}[{i}]: expected a torch.Tensor, got {type(t).__name__}")
            total += t.numel() * t.element_size()
        return total
    raise KVUsageError(f"{what}: expected None, a tensor or a list of tensors, got {type(part).__name__}")


def _check_tokens(tokens: Optional[torch.Tensor], roi: Optional[torch.Tensor], what: str) -> None:
    if tokens is not None:
        if not isinstance(tokens, torch.Tensor):
            raise KVUsageError(f"{what} input_tokens: expected a tensor or None, got {type(tokens).__name__}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise KVUsageError(f"{what} input_tokens: expected integer token ids, got {tokens.dtype}")
    if roi is not None:
        if not isinstance(roi, torch.Tensor):
            raise KVUsageError(f"{what} roi: expected a tensor or None, got {type(roi).__name__}")
        if tokens is None:
            raise KVUsageError(f"{what}: roi given without input_tokens")


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


class _Entry:
    __slots__ = ("eid", "tokens", "roi", "masked", "mkey", "request_id", "key", "value", "hidden",
                 "nbytes", "deadline", "claimed", "aborted")

    def __init__(self, eid: int, tokens: Any, roi: Any, masked: Optional[np.ndarray], request_id: Optional[str],
                 key: Part, value: Part, hidden: Part, nbytes: int, deadline: float):
        self.eid, self.tokens, self.roi, self.masked = eid, tokens, roi, masked
        self.mkey = None if masked is None else masked.tobytes()
        self.request_id, self.key, self.value, self.hidden = request_id, key, value, hidden
        self.nbytes, self.deadline = nbytes, deadline
        self.claimed = False
        self.aborted = False

    def match(self, matched: int) -> Match:
        return Match(self.tokens, self.roi, self.key, self.value, self.hidden, matched, self.request_id)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(a.size, b.size)
    if n == 0:
        return 0
    neq = np.flatnonzero(a[:n] != b[:n])
    return n if neq.size == 0 else int(neq[0])


class LookupBuffer:
    """A bounded in-process store of KV entries; thread-safe.

    Args:
        capacity_bytes: Most bytes of tensors (tokens, roi, key, value, hidden)
            held at once (``kv_buffer_size``).
        lease_s: Default lease: an entry not claimed within this many seconds
            of its insertion is dropped and its bytes released.
        clock: Monotonic time source (tests inject a fake one).
    """

    def __init__(self, capacity_bytes: int, *, lease_s: float = DEFAULT_LEASE_S,
                 clock: Callable[[], float] = time.monotonic):
        if int(capacity_bytes) <= 0:
            raise KVUsageError(f"capacity_bytes must be positive, got {capacity_bytes}")
        if lease_s <= 0:
            raise KVUsageError(f"lease_s must be positive, got {lease_s}")
        self.capacity_bytes = int(capacity_bytes)
        self.lease_s = float(lease_s)
        self._clock = clock
        self._cond = threading.Condition()
        self._entries: Dict[int, _Entry] = {}  # available and claimed, insertion order
        self._by_tokens: Dict[bytes, List[int]] = {}  # available only
        self._by_rid: Dict[str, List[int]] = {}  # available only
        self._ids = itertools.count(1)
        self._bytes = 0
        self._closed = False
        self.expired = 0  # entries dropped by lease expiry, for observability

    # -- observability ---------------------------------------------------
    @property
    def bytes_used(self) -> int:
        """Bytes held by entries, available or claimed (leases are applied first)."""
        with self._cond:
            self._expire_locked()
            return self._bytes

    @property
    def num_entries(self) -> int:
        """Entries held, available or claimed (leases are applied first)."""
        with self._cond:
            self._expire_locked()
            return len(self._entries)

    def stats(self) -> Dict[str, int]:
        """``{"bytes_used", "num_entries", "capacity_bytes"}`` after applying leases."""
        with self._cond:
            self._expire_locked()
            return {"bytes_used": self._bytes, "num_entries": len(self._entries),
                    "capacity_bytes": self.capacity_bytes}

    # -- index helpers (lock held) --------------------------------------------
    def _index(self, e: _Entry) -> None:
        if e.mkey is not None:
            self._by_tokens.setdefault(e.mkey, []).append(e.eid)
        if e.request_id is not None:
            self._by_rid.setdefault(e.request_id, []).append(e.eid)

    def _unindex(self, e: _Entry) -> None:
        for idx, k in ((self._by_tokens, e.mkey), (self._by_rid, e.request_id)):
            if k is None:
                continue
            lst = idx.get(k)
            if lst is not None and e.eid in lst:
                lst.remove(e.eid)
                if not lst:
                    del idx[k]

    def _free(self, e: _Entry) -> None:
        if self._entries.pop(e.eid, None) is not None:
            self._bytes -= e.nbytes
            self._cond.notify_all()

    def _expire_locked(self) -> Optional[float]:
        """Drop available entries past their lease; return the next deadline (or None)."""
        now = self._clock()
        nxt: Optional[float] = None
        dead = []
        for e in self._entries.values():
            if e.claimed:
                continue
            if e.deadline <= now:
                dead.append(e)
            elif nxt is None or e.deadline < nxt:
                nxt = e.deadline
        for e in dead:
            self._unindex(e)
            self._free(e)
            self.expired += 1
            log.info("lookup entry %d (request %s, %d bytes) expired unclaimed", e.eid, e.request_id, e.nbytes)
        return nxt

    def expire(self) -> int:
        """Apply leases now; returns how many entries were dropped."""
        with self._cond:
            before = self.expired
            self._expire_locked()
            return self.expired - before

    # -- insert ----------------------------------------------------------
    def insert(self, input_tokens: Optional[torch.Tensor], roi: Optional[torch.Tensor], key: Part, value: Part,
               hidden: Part, *, request_id: Optional[str] = None, lease_s: Optional[float] = None,
               timeout: Optional[float] = DEFAULT_INSERT_TIMEOUT_S) -> int:
        """Add an entry; returns its id. Tensors are kept by reference (not copied).

        Waits up to ``timeout`` seconds (None: forever is refused, use a number)
        for room when the buffer is full; leases and consumers free room.

        Raises:
            KVUsageError: bad arguments, the entry has neither tokens nor a
                ``request_id``, or the buffer is closed.
            EntryTooLargeError: the entry exceeds ``capacity_bytes``.
            BufferFullError: still no room after ``timeout`` seconds.
        """
        _check_tokens(input_tokens, roi, "insert")
        if input_tokens is None and request_id is None:
            raise KVUsageError("insert: an entry needs input_tokens or a request_id to be found again")
        if timeout is None:
            raise KVUsageError("insert: timeout must be a number of seconds (every wait is bounded)")
        masked = wire.tokens_key(input_tokens, roi)
        nbytes = sum(_part_nbytes(p, w) for p, w in ((input_tokens, "input_tokens"), (roi, "roi"), (key, "key"),
                                                       (value, "value"), (hidden, "hidden")))
        if nbytes > self.capacity_bytes:
            raise EntryTooLargeError(
                f"insert: entry of {nbytes} bytes (request {request_id}) can never fit a buffer of "
                f"{self.capacity_bytes} bytes; raise kv_buffer_size")
        lease = self.lease_s if lease_s is None else float(lease_s)
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    raise KVUsageError("insert: the lookup buffer is closed")
                nxt = self._expire_locked()
                if self._bytes + nbytes <= self.capacity_bytes:
                    break
                left = end - time.monotonic()
                if left <= 0:
                    raise BufferFullError(
                        f"insert: no room for {nbytes} bytes (request {request_id}) within {timeout:.1f}s: "
                        f"{self._bytes}/{self.capacity_bytes} bytes held by {len(self._entries)} entries; "
                        f"consumers are not draining the buffer")
                step = min(left, 0.5)
                if nxt is not None:
                    step = max(0.001, min(step, nxt - self._clock()))
                self._cond.wait(step)
            eid = next(self._ids)
            e = _Entry(eid, input_tokens, roi, masked, request_id, key, value, hidden, nbytes, self._clock() + lease)
            self._entries[eid] = e
            self._index(e)
            self._bytes += nbytes
            self._cond.notify_all()
        log.debug("lookup entry %d inserted (request %s, %d bytes)", eid, request_id, nbytes)
        return eid

    # -- select ----------------------------------------------------------
    def _find_locked(self, masked: Optional[np.ndarray], request_id: Optional[str], prefix: bool,
                     min_prefix: int) -> Optional[tuple]:
        if masked is not None and not prefix:
            for eid in self._by_tokens.get(masked.tobytes(), ()):
                e = self._entries[eid]
                if request_id is None or e.request_id == request_id:
                    return e, int(masked.size)
            return None
        if masked is None:
            ids = self._by_rid.get(request_id, ()) if request_id is not None else ()
            if not ids:
                return None
            e = self._entries[ids[0]]
            return e, 0 if e.masked is None else int(e.masked.size)
        cands = self._by_rid.get(request_id, ()) if request_id is not None else [
            eid for lst in self._by_tokens.values() for eid in lst]
        best, best_n = None, -1
        for eid in cands:
            e = self._entries[eid]
            if e.masked is None:
                continue
            n = _common_prefix(masked, e.masked)
            if n > best_n or (n == best_n and best is not None and e.eid < best.eid):
                best, best_n = e, n
        if best is None or best_n < max(1, min_prefix):
            return None
        return best, best_n

    def claim(self, input_tokens: Optional[torch.Tensor], roi: Optional[torch.Tensor], *,
              request_id: Optional[str] = None, prefix: bool = False, min_prefix: int = 1, wait_s: float = 0.0,
              cancel: Optional[threading.Event] = None) -> Optional[tuple]:
        """Find and claim a matching entry, waiting up to ``wait_s`` for one to be inserted.

        Returns ``(handle, Match)`` or None. The claimed entry is invisible to
        other queries and keeps its bytes until :meth:`release` (consumed) or
        :meth:`unclaim` (the hand-over failed; it becomes available again).
        """
        _check_tokens(input_tokens, roi, "drop_select")
        if input_tokens is None and request_id is None:
            raise KVUsageError("drop_select: a query needs input_tokens or a request_id")
        masked = wire.tokens_key(input_tokens, roi)
        end = time.monotonic() + max(0.0, float(wait_s))
        with self._cond:
            while True:
                if self._closed:
                    return None
                nxt = self._expire_locked()
                hit = self._find_locked(masked, request_id, prefix, min_prefix)
                if hit is not None:
                    e, n = hit
                    self._unindex(e)
                    e.claimed = True
                    return e, e.match(n)
                left = end - time.monotonic()
                if left <= 0 or (cancel is not None and cancel.is_set()):
                    return None
                step = min(left, 0.1 if cancel is not None else 0.5)
                if nxt is not None:
                    step = max(0.001, min(step, nxt - self._clock()))
                self._cond.wait(step)

    def release(self, handle: Any) -> None:
        """The claimed entry was delivered: drop it and free its bytes (idempotent)."""
        with self._cond:
            self._free(handle)

    def unclaim(self, handle: Any) -> None:
        """The hand-over failed: make the entry available again (dropped if aborted or closed)."""
        with self._cond:
            if handle.eid not in self._entries:
                return
            handle.claimed = False
            if handle.aborted or self._closed:
                self._free(handle)
            else:
                self._index(handle)
                self._cond.notify_all()

    def fetch(self, input_tokens: Optional[torch.Tensor] = None, roi: Optional[torch.Tensor] = None, *,
              request_id: Optional[str] = None, prefix: bool = False, min_prefix: int = 1, wait_s: float = 0.0,
              device: Any = None, timeout: Optional[float] = None) -> Optional[Match]:
        """Select and drop the matching entry; None when nothing matched within ``wait_s`` seconds.

        ``device`` moves the returned tensors there (they are the stored ones
        otherwise). ``timeout`` is accepted for signature parity with
        :meth:`LookupClient.fetch` and unused.
        """
        hit = self.claim(input_tokens, roi, request_id=request_id, prefix=prefix, min_prefix=min_prefix,
                         wait_s=wait_s)
        if hit is None:
            return None
        handle, m = hit
        self.release(handle)
        if device is not None:
            m = _to_device(m, device)
        return m

    def drop_select(self, input_tokens: Optional[torch.Tensor], roi: Optional[torch.Tensor], *,
                    wait_s: float = 0.0, **kw: Any) -> List[Any]:
        """``[input_tokens, roi, key, value, hidden]`` of the matching entry, removed from the buffer.

        All five are None when nothing matched within ``wait_s`` seconds. See
        :meth:`fetch` for the keyword arguments (``request_id``, ``prefix``...).
        """
        m = self.fetch(input_tokens, roi, wait_s=wait_s, **kw)
        return [None] * 5 if m is None else m.as_list()

    def abort(self, request_id: str) -> int:
        """Drop the entries of ``request_id``; returns how many (claimed ones go when their send ends)."""
        n = 0
        with self._cond:
            for e in list(self._entries.values()):
                if e.request_id != request_id:
                    continue
                n += 1
                if e.claimed:
                    e.aborted = True
                else:
                    self._unindex(e)
                    self._free(e)
        if n:
            log.info("aborted %d lookup entr%s of request %s", n, "y" if n == 1 else "ies", request_id)
        return n

    def close(self) -> None:
        """Drop every available entry, wake all waiters, refuse further inserts (idempotent)."""
        with self._cond:
            self._closed = True
            for e in list(self._entries.values()):
                if e.claimed:
                    e.aborted = True
                else:
                    self._unindex(e)
                    self._free(e)
            self._cond.notify_all()

    def __enter__(self) -> "LookupBuffer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- remote access ---------------------------------------------------
    def serve(self, host: str = "127.0.0.1", port: int = 0, **kw: Any) -> "LookupServer":
        """Serve this buffer to remote consumers; see :class:`LookupServer` for ``kw``."""
        return LookupServer(self, host, port, **kw)

    @staticmethod
    def connect(address: str, **kw: Any) -> "LookupClient":
        """A client of the buffer served at ``address``; see :class:`LookupClient` for ``kw``."""
        return LookupClient(address, **kw)


def _to_device(m: Match, device: Any) -> Match:
    def mv(p: Part) -> Part:
        if p is None:
            return None
        if isinstance(p, torch.Tensor):
            return p.to(device)
        return [t.to(device) for t in p]

    return Match(mv(m.input_tokens), mv(m.roi), mv(m.key), mv(m.value), mv(m.hidden), m.matched, m.request_id)


# =============================================================================
# Producer side: the server
# =============================================================================
class LookupServer:
    """Serves a :class:`LookupBuffer` over a :class:`transport.PipeListener`.

    One accept thread hands each connecting consumer's pipe to its own handler
    thread; a reaper thread applies leases every ``reap_interval_s``. A
    handler answers a bad message with an :class:`ErrorReply` and keeps
    serving; a consumer that dies or closes ends only its own handler, and an
    entry whose send failed becomes available again (its lease still runs).

    Args:
        buffer: The buffer to serve (not owned: ``close`` leaves it open).
        host, port: Where to listen (port 0 picks one; see :attr:`address`).
        max_wait_s: Cap on the wait a consumer may ask for in one query.
        send_timeout_s: Bound on sending one answer.
        timeout_s, peer_timeout_s, heartbeat_s: Passed to the listener's pipes.
        auth: Who may connect (a ``transport.auth.Auth``; None reads ``UCXKV_AUTH``).
    """

    SERVICE = "kvlookup"

    def __init__(self, buffer: LookupBuffer, host: str = "127.0.0.1", port: int = 0, *, max_wait_s: float = 60.0,
                 send_timeout_s: float = 30.0, timeout_s: float = 60.0, peer_timeout_s: float = 10.0,
                 heartbeat_s: float = 0.5, reap_interval_s: float = 0.25, name: Optional[str] = None,
                 auth: Any = None):
        from transport import PipeListener

        self.buffer = buffer
        self.max_wait_s = float(max_wait_s)
        self.send_timeout_s = float(send_timeout_s)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pipes: List[Any] = []
        self._threads: List[threading.Thread] = []
        self.served = 0  # answers with a match that were delivered
        self.failed_sends = 0
        self._listener = PipeListener(host, port, name=name, service=self.SERVICE, timeout_s=timeout_s,
                                      peer_timeout_s=peer_timeout_s, heartbeat_s=heartbeat_s, auth=auth,
                                      max_tensor_bytes=wire.MAX_REQUEST_TENSOR_BYTES)
        self.address: str = self._listener.address
        self._reap_interval_s = reap_interval_s
        ready = threading.Event()
        for target, nm in ((self._accept_loop, "accept"), (self._reap_loop, "reaper")):
            t = threading.Thread(target=target, args=(ready,) if nm == "accept" else (), daemon=True,
                                 name=f"kvlookup-{nm}")
            t.start()
            self._threads.append(t)
        if not ready.wait(10):
            raise KVTransferError("lookup server accept thread did not start within 10s")
        log.info("lookup server for %d-byte buffer on %s", buffer.capacity_bytes, self.address)

    @property
    def num_consumers(self) -> int:
        """Consumer pipes currently being served."""
        with self._lock:
            return len(self._pipes)

    def _accept_loop(self, ready: threading.Event) -> None:
        from transport import PeerTimeoutError

        ready.set()
        while not self._stop.is_set():
            try:
                pipe = self._listener.accept(timeout=0.2)
            except PeerTimeoutError:
                continue
            except Exception:  # noqa: BLE001 - the listener closed under us
                if not self._stop.is_set():
                    log.exception("lookup server %s: accept failed", self.address)
                break
            with self._lock:
                if self._stop.is_set():
                    pipe.close()
                    break
                self._pipes.append(pipe)
                t = threading.Thread(target=self._serve_pipe, args=(pipe,), daemon=True,
                                     name=f"kvlookup-{pipe.peer}")
                # forget finished handlers: a long-lived server sees many short-lived consumers
                self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _reap_loop(self) -> None:
        while not self._stop.wait(self._reap_interval_s):
            try:
                self.buffer.expire()
            except Exception:  # noqa: BLE001 - keep reaping
                log.exception("lookup server %s: lease reaper failed", self.address)

    def _serve_pipe(self, pipe: Any) -> None:
        from transport import PeerError, PeerTimeoutError

        peer = pipe.peer
        log.info("lookup server %s: consumer %s connected", self.address, peer)
        try:
            while not self._stop.is_set():
                try:
                    frame = pipe.recv_tensor(timeout=1.0)  # close() interrupts it at once
                except PeerTimeoutError:
                    continue  # nothing yet; the receive stays posted
                try:
                    _, n = wire.read_preamble(frame, peer)
                except LookupProtocolError as exc:
                    # Cannot tell what follows: answer, then drop this consumer only.
                    log.warning("lookup server %s: %s; closing that pipe", self.address, exc)
                    pipe.send_tensors([wire.encode(wire.ErrorReply(-1, "protocol", str(exc)))],
                                      timeout=self.send_timeout_s)
                    break
                # the request says what follows before anything is received: never more than it needs
                try:
                    msg, _ = wire.decode_request(frame, peer)
                except LookupProtocolError as exc:
                    code = "version" if isinstance(exc, WireVersionError) else "protocol"
                    log.warning("lookup server %s: %s", self.address, exc)
                    pipe.send_tensors([wire.encode(wire.ErrorReply(-1, code, str(exc)))],
                                      timeout=self.send_timeout_s)
                    if n > wire.MAX_REQUEST_TENSORS:
                        break  # cannot stay in step without receiving what no request carries: drop it
                    for _ in range(n):
                        pipe.recv_tensor(timeout=self.send_timeout_s)
                    continue
                tensors = [pipe.recv_tensor(timeout=self.send_timeout_s) for _ in range(n)]
                if not self._handle(pipe, msg, tensors):
                    break
        except PeerError as exc:
            log.info("lookup server %s: consumer %s gone: %s", self.address, peer, exc)
        except Exception:  # noqa: BLE001 - one consumer's failure must not kill the server
            if self._stop.is_set():
                return  # close() closed this pipe under the handler: the expected way out
            log.exception("lookup server %s: handler for %s failed", self.address, peer)
        finally:
            with self._lock:
                if pipe in self._pipes:
                    self._pipes.remove(pipe)
            pipe.close()

    def _handle(self, pipe: Any, msg: Any, tensors: List[Any]) -> bool:
        """Answer one decoded request; False when the pipe must be dropped."""
        peer = pipe.peer
        if isinstance(msg, wire.Stats):
            s = self.buffer.stats()
            pipe.send_tensors([wire.encode(wire.StatsReply(msg.seq, s["bytes_used"], s["num_entries"],
                                                           s["capacity_bytes"]))], timeout=self.send_timeout_s)
            return True
        if isinstance(msg, wire.Abort):
            n = self.buffer.abort(msg.request_id)
            pipe.send_tensors([wire.encode(wire.AbortReply(msg.seq, n))], timeout=self.send_timeout_s)
            return True
        # Fetch
        if len(tensors) != 2:
            err = wire.ErrorReply(msg.seq, "malformed", f"Fetch must be followed by 2 tensors, got {len(tensors)}")
            pipe.send_tensors([wire.encode(err)], timeout=self.send_timeout_s)
            return True
        tokens, roi = tensors
        try:
            hit = self.buffer.claim(tokens, roi, request_id=msg.request_id, prefix=msg.prefix,
                                    min_prefix=msg.min_prefix, wait_s=min(max(0.0, msg.wait_s), self.max_wait_s),
                                    cancel=self._stop)
        except KVUsageError as exc:
            pipe.send_tensors([wire.encode(wire.ErrorReply(msg.seq, "bad_query", str(exc)))],
                              timeout=self.send_timeout_s)
            return True
        if hit is None:
            pipe.send_tensors([wire.encode(wire.NotFound(msg.seq))], timeout=self.send_timeout_s)
            return True
        handle, m = hit
        codes, flat = wire.flatten_parts([m.key, m.value, m.hidden])
        head = wire.encode(wire.Found(msg.seq, m.matched, codes, m.request_id), 2 + len(flat))
        try:
            pipe.send_tensors([head, m.input_tokens, m.roi, *flat], timeout=self.send_timeout_s)
        except BaseException:
            self.failed_sends += 1
            self.buffer.unclaim(handle)
            log.warning("lookup server %s: answer to %s failed; entry of request %s is available again "
                        "until its lease ends", self.address, peer, m.request_id)
            raise
        self.buffer.release(handle)
        self.served += 1
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting and serving, close every consumer pipe (idempotent, bounded)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._listener.close()
        with self._lock:
            pipes, self._pipes = self._pipes, []
        for p in pipes:  # interrupts the handlers' waits
            p.close()
        end = time.monotonic() + timeout
        for t in list(self._threads):
            if t is not threading.current_thread():
                t.join(max(0.0, end - time.monotonic()))
        log.info("lookup server %s closed", self.address)

    def __enter__(self) -> "LookupServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# =============================================================================
# Consumer side: clients
# =============================================================================
class LookupClient:
    """A consumer's connection to one producer's :class:`LookupServer`.

    Requests on one client are serialised (one in flight); use one client per
    thread for concurrency. After a transport failure or a timed-out answer
    the client is broken: every later call raises :class:`PeerUnavailableError`.

    Args:
        address: ``host:port`` of the server.
        timeout_s: Default bound on one request beyond the query's own ``wait_s``.
        device: Where received tensors land by default.
        auth: How to authenticate (a ``transport.auth.Auth``; None reads ``UCXKV_AUTH``).
    """

    def __init__(self, address: str, *, timeout_s: float = 30.0, peer_timeout_s: float = 10.0,
                 heartbeat_s: float = 0.5, device: Any = "cpu", name: Optional[str] = None,
                 meta: Optional[Dict[str, str]] = None, auth: Any = None):
        from transport import Pipe, TransportError

        self.address = address
        self.timeout_s = float(timeout_s)
        self.device = device
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._broken: Optional[str] = None
        self._closed = False
        try:
            self._pipe = Pipe.connect(address, name=name, service=LookupServer.SERVICE, timeout_s=timeout_s,
                                      peer_timeout_s=peer_timeout_s, heartbeat_s=heartbeat_s, device=device,
                                      meta=meta, auth=auth)
        except TransportError as exc:
            raise PeerUnavailableError(f"cannot reach lookup server {address}: {exc}") from exc

    def _rpc(self, msg: Any, tensors: Sequence[Any], timeout: float, device: Any) -> tuple:
        from transport import PeerTimeoutError, TransportError

        with self._lock:
            if self._closed:
                raise KVUsageError(f"lookup client to {self.address} is closed")
            if self._broken is not None:
                raise PeerUnavailableError(f"lookup client to {self.address} is broken: {self._broken}")
            try:
                self._pipe.send_tensors([wire.encode(msg, len(tensors)), *tensors], timeout=timeout)
                frame = self._pipe.recv_tensor(timeout=timeout)
                _, n = wire.read_preamble(frame, self.address)
                # all n receives posted at once: the tensors stream back to back, no round trip each
                rest = self._pipe.recv_tensors_async(n, device).wait(timeout) if n else []
                ans, _ = wire.decode_response(frame, self.address)
            except PeerTimeoutError as exc:
                self._broken = f"no answer within {timeout:.1f}s"
                raise PeerUnavailableError(
                    f"lookup server {self.address} did not answer {type(msg).__name__} #{msg.seq} "
                    f"within {timeout:.1f}s") from exc
            except TransportError as exc:
                self._broken = str(exc)
                raise PeerUnavailableError(f"lookup server {self.address}: {exc}") from exc
            except LookupProtocolError:
                self._broken = "protocol error"
                raise
        if isinstance(ans, wire.ErrorReply):
            cls = WireVersionError if ans.code == "version" else ProducerError
            raise cls(f"lookup server {self.address} refused {type(msg).__name__} #{msg.seq}: "
                      f"[{ans.code}] {ans.message}")
        if getattr(ans, "seq", None) != msg.seq:
            self._broken = "answer out of order"
            raise LookupProtocolError(f"lookup server {self.address} answered #{ans.seq}, expected #{msg.seq}")
        return ans, rest

    def fetch(self, input_tokens: Optional[torch.Tensor] = None, roi: Optional[torch.Tensor] = None, *,
              request_id: Optional[str] = None, prefix: bool = False, min_prefix: int = 1, wait_s: float = 0.0,
              device: Any = None, timeout: Optional[float] = None) -> Optional[Match]:
        """Select and drop the matching entry on the producer; None if nothing matched within ``wait_s``.

        The whole call is bounded by ``wait_s + timeout`` (``timeout`` defaults
        to the client's ``timeout_s``). Tensors land on ``device``.

        Raises:
            KVUsageError: bad query; PeerUnavailableError: the producer is
            unreachable or silent; ProducerError: it refused the query.
        """
        _check_tokens(input_tokens, roi, "drop_select")
        if input_tokens is None and request_id is None:
            raise KVUsageError("drop_select: a query needs input_tokens or a request_id")
        t = (self.timeout_s if timeout is None else timeout) + max(0.0, wait_s)
        msg = wire.Fetch(next(self._seq), request_id, bool(prefix), int(min_prefix), float(wait_s))
        ans, rest = self._rpc(msg, [input_tokens, roi], t, self.device if device is None else device)
        if isinstance(ans, wire.NotFound):
            return None
        if not isinstance(ans, wire.Found) or len(rest) != 2 + wire.count_parts(ans.parts):
            raise LookupProtocolError(f"lookup server {self.address} sent a malformed answer to Fetch #{msg.seq}")
        key, value, hidden = wire.unflatten_parts(ans.parts, rest[2:], self.address)
        return Match(rest[0], rest[1], key, value, hidden, ans.matched, ans.request_id)

    def drop_select(self, input_tokens: Optional[torch.Tensor], roi: Optional[torch.Tensor], *,
                    wait_s: float = 0.0, **kw: Any) -> List[Any]:
        """``[input_tokens, roi, key, value, hidden]``, all None when nothing matched within ``wait_s``."""
        m = self.fetch(input_tokens, roi, wait_s=wait_s, **kw)
        return [None] * 5 if m is None else m.as_list()

    def stats(self, timeout: Optional[float] = None) -> Dict[str, int]:
        """The remote buffer's ``bytes_used``, ``num_entries``, ``capacity_bytes``."""
        ans, _ = self._rpc(wire.Stats(next(self._seq)), [], self.timeout_s if timeout is None else timeout, None)
        return {"bytes_used": ans.bytes_used, "num_entries": ans.num_entries, "capacity_bytes": ans.capacity_bytes}

    def abort(self, request_id: str, timeout: Optional[float] = None) -> int:
        """Ask the producer to drop ``request_id``'s entries; returns how many it dropped."""
        ans, _ = self._rpc(wire.Abort(next(self._seq), str(request_id)), [],
                           self.timeout_s if timeout is None else timeout, None)
        return ans.dropped

    def close(self) -> None:
        """Close the pipe (idempotent)."""
        if not self._closed:
            self._closed = True
            self._pipe.close()

    def __enter__(self) -> "LookupClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MultiProducerClient:
    """One consumer, several producers (xPyD): queries each producer in turn until one matches.

    Each producer is asked with no wait (so no two producers hand over an
    entry for one query); rounds repeat with a short back-off until ``wait_s``
    runs out. A producer that is unreachable is skipped (logged) while others
    remain; if all are broken the error of the last one is raised.
    """

    def __init__(self, clients: Sequence[Any], *, own: bool = True):
        if not clients:
            raise KVUsageError("MultiProducerClient needs at least one client")
        self.clients = list(clients)
        self._own = own
        self._next = 0

    def fetch(self, input_tokens: Optional[torch.Tensor] = None, roi: Optional[torch.Tensor] = None, *,
              wait_s: float = 0.0, **kw: Any) -> Optional[Match]:
        """Like :meth:`LookupClient.fetch`, over all producers; None after ``wait_s`` without a match."""
        end = time.monotonic() + max(0.0, wait_s)
        pause = 0.002
        while True:
            errors: List[Exception] = []
            for i in range(len(self.clients)):
                c = self.clients[(self._next + i) % len(self.clients)]
                try:
                    m = c.fetch(input_tokens, roi, wait_s=0.0, **kw)
                except PeerUnavailableError as exc:
                    errors.append(exc)
                    continue
                if m is not None:
                    self._next = (self._next + i + 1) % len(self.clients)
                    return m
            if len(errors) == len(self.clients):
                raise errors[-1]
            left = end - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.05)

    def drop_select(self, input_tokens: Optional[torch.Tensor], roi: Optional[torch.Tensor], *,
                    wait_s: float = 0.0, **kw: Any) -> List[Any]:
        """``[input_tokens, roi, key, value, hidden]`` from whichever producer matched, or five Nones."""
        m = self.fetch(input_tokens, roi, wait_s=wait_s, **kw)
        return [None] * 5 if m is None else m.as_list()

    def abort(self, request_id: str) -> int:
        """Abort ``request_id`` on every reachable producer; returns the total dropped."""
        n = 0
        for c in self.clients:
            try:
                n += c.abort(request_id)
            except PeerUnavailableError as exc:
                log.warning("abort of %s skipped a producer: %s", request_id, exc)
        return n

    def close(self) -> None:
        """Close the clients if owned (idempotent)."""
        if self._own:
            for c in self.clients:
                c.close()

    def __enter__(self) -> "MultiProducerClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
