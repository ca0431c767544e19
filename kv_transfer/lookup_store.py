"""The LookupBuffer: a bounded, leased, thread-safe in-process store of KV entries with SQL-like access.

``insert`` adds an entry (input tokens, a region-of-interest mask, key, value,
hidden); ``drop_select`` returns the entry whose masked tokens match a query and
removes it. Byte capacity with back-pressure, leases (TTL) after which unclaimed
entries are dropped, exact or longest-prefix matching, ``request_id`` scoping,
abort. :meth:`LookupBuffer.serve` puts it on the network
(:class:`~kv_transfer.LookupServer`); :meth:`LookupBuffer.connect` reaches a
served one (:class:`~kv_transfer.LookupClient`), with the same
``fetch``/``drop_select`` signature, so callers do not care where the buffer lives.

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

Shared entries (tensor parallelism: several decode ranks read one prefill
rank's entry): a claim with ``readers=n`` on an entry not claimed before sets
its count of readers to ``n``; the entry stays available (and its lease stays
off while a send is in flight) until ``n`` claims were released, then it is
dropped. An unclaimed (failed) hand-over gives its read back.

Retained entries (decode failover): an entry inserted with ``retain=True`` is
not consumed by a fetch: every claim is a read that leaves it available, so a
second consumer (a decode instance taking over from one that died after
loading) can fetch it again. It goes when ``abort(request_id)`` arrives (the
consumer's acknowledgement that its request completed), when its lease ends
(counted from the insert, never renewed: ``lease_s`` bounds how long its bytes
are held), or on ``close``; reads in flight delay that drop until they end.

Inserted tensors are stored by reference, not copied: do not modify them after
``insert``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import numpy as np
import torch

from transport import _cuda_order

from . import _lookup_wire as wire
from .errors import BufferFullError, EntryTooLargeError, KVUsageError
from .lookup_client import LookupClient
from .lookup_server import LookupServer
from .lookup_source import Match, Part, check_query, check_readers, narrow_part

log = logging.getLogger(__name__)

__all__ = ["LookupBuffer", "DEFAULT_LEASE_S", "DEFAULT_INSERT_TIMEOUT_S"]

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


class _Entry:
    __slots__ = ("eid", "tokens", "roi", "masked", "mkey", "request_id", "key", "value", "hidden",
                 "nbytes", "deadline", "claimed", "aborted", "reads_left", "sends", "retain", "written")

    def __init__(self, eid: int, tokens: Any, roi: Any, masked: Optional[np.ndarray], request_id: Optional[str],
                 key: Part, value: Part, hidden: Part, nbytes: int, deadline: float, retain: bool = False,
                 written: _cuda_order.Recorded = None):
        self.eid, self.tokens, self.roi, self.masked = eid, tokens, roi, masked
        self.mkey = None if masked is None else masked.tobytes()
        self.request_id, self.key, self.value, self.hidden = request_id, key, value, hidden
        self.nbytes, self.deadline = nbytes, deadline
        self.claimed = False  # every read handed out: no longer indexed
        self.aborted = False
        self.reads_left: Optional[int] = None  # set by the first claim's readers
        self.sends = 0  # claims handed out and not yet released or unclaimed
        self.retain = retain  # reads never consume it: it stays until abort (the acknowledgement) or lease
        #: device tensors: events after the kernels that wrote them, queued before the insert (see insert)
        self.written = written

    @property
    def busy(self) -> bool:
        """A send is in flight or every read was handed out: leases, abort and close must not free it now."""
        return self.claimed or self.sends > 0

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
        # claim and release take the lock itself (one C call each way where the Condition's __enter__ is
        # Python) and notify only when someone waits: both sit on every lookup's path
        self._mutex = threading.RLock()
        self._cond = threading.Condition(self._mutex)
        self._waiters = 0  # threads in _wait_locked
        self._entries: Dict[int, _Entry] = {}  # available and claimed, insertion order
        self._by_tokens: Dict[bytes, List[int]] = {}  # available only
        self._by_rid: Dict[str, List[int]] = {}  # available only
        # (deadline, eid) of every entry, earliest first: a lease check looks at the few due entries, never at all
        # of them (a scan of thousands of entries per claim cost ~400 us of a lookup's round trip; docs/bench.md)
        self._leases: List[Tuple[float, int]] = []
        self._overdue: Set[int] = set()  # past their lease while busy: expire once the send ends
        self._ids = itertools.count(1)
        self._bytes = 0
        self._closed = False
        self.expired = 0  # entries dropped by lease expiry, for observability

    # -- observability ---------------------------------------------------
    @property
    def bytes_used(self) -> int:
        """Bytes held by entries, available or claimed (leases are applied first)."""
        with self._mutex:
            self._expire_locked()
            return self._bytes

    @property
    def num_entries(self) -> int:
        """Entries held, available or claimed (leases are applied first)."""
        with self._mutex:
            self._expire_locked()
            return len(self._entries)

    def stats(self) -> Dict[str, int]:
        """``{"bytes_used", "num_entries", "capacity_bytes"}`` after applying leases."""
        with self._mutex:
            self._expire_locked()
            return {"bytes_used": self._bytes, "num_entries": len(self._entries),
                    "capacity_bytes": self.capacity_bytes}

    # -- lock helpers (lock held) ---------------------------------------------
    def _wait_locked(self, timeout: float) -> None:
        self._waiters += 1
        try:
            self._cond.wait(timeout)
        finally:
            self._waiters -= 1

    def _notify_locked(self) -> None:
        """Wake every waiter (an insert waiting for room, a claim waiting for an entry) if there is one."""
        if self._waiters:
            self._cond.notify_all()

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
            self._drop_freed_leases()
            self._notify_locked()

    def _drop_freed_leases(self) -> None:
        """Pop freed entries off the head of the lease heap, and rebuild it once it is mostly freed entries.

        Done where entries are freed (release runs after the answer is sent), so that the lease
        check of the next claim, on the lookup's path, finds a live head and costs one comparison.
        """
        leases = self._leases
        while leases and leases[0][1] not in self._entries:
            heapq.heappop(leases)
        if len(leases) > 2 * len(self._entries) + 64:  # freed entries deep in the heap: rebuild from the live ones
            self._leases = leases = [(e.deadline, e.eid) for e in self._entries.values() if e.eid not in self._overdue]
            heapq.heapify(leases)

    def _expire_locked(self) -> Optional[float]:
        """Drop available entries past their lease; return the next deadline (or None).

        Costs O(k log n) for k entries due (or freed since), not O(n): the leases are a heap.
        """
        now = self._clock()
        leases = self._leases
        if not self._overdue and (not leases or leases[0][0] > now):
            return leases[0][0] if leases else None  # nothing due (the head is live: see _drop_freed_leases)
        dead = []
        if self._overdue:
            for eid in list(self._overdue):
                e = self._entries.get(eid)
                if e is None or not e.busy:
                    self._overdue.discard(eid)
                    if e is not None:
                        dead.append(e)
        while leases and (leases[0][0] <= now or leases[0][1] not in self._entries):
            _, eid = heapq.heappop(leases)
            e = self._entries.get(eid)
            if e is None:
                continue  # freed before its lease ended
            if e.busy:
                self._overdue.add(eid)  # a send is in flight: it expires when that ends
            else:
                dead.append(e)
        for e in dead:
            self._unindex(e)
            self._free(e)  # (may rebuild the heap)
            self.expired += 1
            log.info("lookup entry %d (request %s, %d bytes) expired unclaimed", e.eid, e.request_id, e.nbytes)
        leases = self._leases
        return leases[0][0] if leases else None

    def expire(self) -> int:
        """Apply leases now; returns how many entries were dropped."""
        with self._mutex:
            before = self.expired
            self._expire_locked()
            return self.expired - before

    # -- insert ----------------------------------------------------------
    def insert(self, input_tokens: Optional[torch.Tensor], roi: Optional[torch.Tensor], key: Part, value: Part,
               hidden: Part, *, request_id: Optional[str] = None, lease_s: Optional[float] = None,
               timeout: Optional[float] = DEFAULT_INSERT_TIMEOUT_S, retain: bool = False) -> int:
        """Add an entry; returns its id. Tensors are kept by reference (not copied).

        CUDA tensors: the insert does not wait for the kernels queued (on this thread's current
        streams) to write them; every read of the entry, a server's send or a local fetch, is
        ordered after those kernels.

        ``retain``: fetches do not consume the entry; it stays available until
        ``abort(request_id)``, its lease or ``close`` (see the module docstring).

        Waits up to ``timeout`` seconds (None: forever is refused, use a number)
        for room when the buffer is full; leases and consumers free room.

        Raises:
            KVUsageError: bad arguments, the entry has neither tokens nor a
                ``request_id``, or the buffer is closed.
            EntryTooLargeError: the entry exceeds ``capacity_bytes``.
            BufferFullError: still no room after ``timeout`` seconds.
        """
        check_query(input_tokens, roi, "insert")
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
        # the entry is read later, from the server's threads and streams or by a local fetch: the kernels
        # that wrote its device tensors, queued on this thread's streams, must have run by then; the insert
        # does not wait for them (an engine saving a layer keeps queueing its forward), it records where
        # they end, and each read waits there (a server's thread before it sends, a fetch on its stream)
        written = _cuda_order.record(t.device for t in wire.flatten_parts([key, value, hidden])[1] if not t.is_cpu)
        lease = self.lease_s if lease_s is None else float(lease_s)
        end = time.monotonic() + timeout
        with self._mutex:
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
                self._wait_locked(step)
            eid = next(self._ids)
            e = _Entry(eid, input_tokens, roi, masked, request_id, key, value, hidden, nbytes, self._clock() + lease,
                       retain=bool(retain), written=written)
            self._entries[eid] = e
            heapq.heappush(self._leases, (e.deadline, eid))
            self._index(e)
            self._bytes += nbytes
            self._notify_locked()
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
              cancel: Optional[threading.Event] = None, readers: int = 1) -> Optional[tuple]:
        """Find and claim a matching entry, waiting up to ``wait_s`` for one to be inserted.

        Returns ``(handle, Match)`` or None. The claimed entry is invisible to
        other queries and keeps its bytes until :meth:`release` (consumed) or
        :meth:`unclaim` (the hand-over failed; it becomes available again).
        ``readers`` (first claim of an entry only) shares the entry between
        that many claims: it stays visible until the last one was handed out
        and is dropped when every handed-out claim was released.
        """
        check_query(input_tokens, roi, "drop_select")
        check_readers(readers)
        if input_tokens is None and request_id is None:
            raise KVUsageError("drop_select: a query needs input_tokens or a request_id")
        masked = wire.tokens_key(input_tokens, roi)
        end = time.monotonic() + max(0.0, float(wait_s))
        with self._mutex:
            while True:
                if self._closed:
                    return None
                nxt = self._expire_locked()
                hit = self._find_locked(masked, request_id, prefix, min_prefix)
                if hit is not None:
                    e, n = hit
                    e.sends += 1
                    if e.retain:  # a read, not a consumption: it stays visible
                        return e, e.match(n)
                    e.reads_left = (readers if e.reads_left is None else e.reads_left) - 1
                    if e.reads_left <= 0:
                        self._unindex(e)
                        e.claimed = True
                    return e, e.match(n)
                left = end - time.monotonic()
                if left <= 0 or (cancel is not None and cancel.is_set()):
                    return None
                step = min(left, 0.1 if cancel is not None else 0.5)
                if nxt is not None:
                    step = max(0.001, min(step, nxt - self._clock()))
                self._wait_locked(step)

    def release(self, handle: Any) -> None:
        """The claimed entry was delivered: drop it and free its bytes once its last reader got it (idempotent)."""
        with self._mutex:
            if handle.eid not in self._entries:
                return
            handle.sends = max(0, handle.sends - 1)
            if handle.sends == 0 and (handle.claimed or handle.aborted or self._closed):
                if not handle.claimed:
                    self._unindex(handle)
                self._free(handle)

    def unclaim(self, handle: Any) -> None:
        """The hand-over failed: make the entry available again (dropped if aborted or closed)."""
        with self._mutex:
            if handle.eid not in self._entries:
                return
            handle.sends = max(0, handle.sends - 1)
            if handle.retain and not (handle.aborted or self._closed):
                self._notify_locked()  # still indexed: nothing to put back
                return
            handle.reads_left = (handle.reads_left or 0) + 1
            was_claimed, handle.claimed = handle.claimed, False
            if handle.aborted or self._closed:
                if not was_claimed:
                    self._unindex(handle)
                if handle.sends == 0:
                    self._free(handle)
                else:
                    handle.claimed = True  # hidden until the sends in flight end
            else:
                if was_claimed:
                    self._index(handle)
                self._notify_locked()

    def fetch(self, input_tokens: Optional[torch.Tensor] = None, roi: Optional[torch.Tensor] = None, *,
              request_id: Optional[str] = None, prefix: bool = False, min_prefix: int = 1, wait_s: float = 0.0,
              device: Any = None, timeout: Optional[float] = None, narrow: Optional[List[int]] = None,
              readers: int = 1) -> Optional[Match]:
        """Select and drop the matching entry; None when nothing matched within ``wait_s`` seconds.

        ``device`` moves the returned tensors there (they are the stored ones
        otherwise). ``timeout`` is accepted for signature parity with
        :meth:`LookupClient.fetch` and unused. ``narrow`` (``[dim, start,
        length]``) cuts every key tensor (copies); ``readers`` as in :meth:`claim`.
        """
        hit = self.claim(input_tokens, roi, request_id=request_id, prefix=prefix, min_prefix=min_prefix,
                         wait_s=wait_s, readers=readers)
        if hit is None:
            return None
        handle, m = hit
        _cuda_order.order_after(handle.written)  # this thread's streams read the tensors after their writers
        try:
            m.key = narrow_part(m.key, narrow, "fetch")
        except KVUsageError:
            self.unclaim(handle)
            raise
        self.release(handle)
        if device is not None:
            m = m.to(device)
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
        with self._mutex:
            for e in list(self._entries.values()):
                if e.request_id != request_id:
                    continue
                n += 1
                self._retire(e)
        if n:
            log.info("aborted %d lookup entr%s of request %s", n, "y" if n == 1 else "ies", request_id)
        return n

    def _retire(self, e: Any) -> None:
        # Caller holds the lock. An entry being sent is marked and freed by its sender when that ends.
        if e.busy:
            e.aborted = True
            if not e.claimed:
                self._unindex(e)
                e.claimed = True
        else:
            self._unindex(e)
            self._free(e)

    def close(self) -> None:
        """Drop every available entry, wake all waiters, refuse further inserts (idempotent)."""
        with self._mutex:
            self._closed = True
            for e in list(self._entries.values()):
                self._retire(e)
            self._notify_locked()

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


