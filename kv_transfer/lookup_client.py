"""The consumer side of a served LookupBuffer: a client of one producer, and one over several producers (xPyD).

Both have the same ``fetch``/``drop_select``/``abort`` signature as
:class:`~kv_transfer.LookupBuffer` (they are :class:`~kv_transfer.KVSource`\\ s).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from transport import PeerTimeoutError, Pipe, PipeOptions, TransportError
from transport.auth import Auth

from . import _lookup_wire as wire
from .errors import KVUsageError, LookupProtocolError, PeerUnavailableError, ProducerError, WireVersionError
from ._serving import KV_PIPE_OPTIONS
from .lookup_server import SERVICE
from .lookup_source import KVSource, Match, check_query, check_readers

log = logging.getLogger(__name__)

__all__ = ["LookupClient", "MultiProducerClient"]


class LookupClient:
    """A consumer's connection to one producer's :class:`~kv_transfer.LookupServer`.

    Requests on one client are serialised (one in flight); use one client per
    thread for concurrency. After a transport failure or a timed-out answer
    the client is broken: without ``redial`` every later call raises
    :class:`PeerUnavailableError`; with ``redial`` the next call dials the
    producer again (a restarted producer is reached without a new client), and
    a request that fails on a connection made before this call is sent once
    more on a fresh one (a connection from before a producer restart fails
    exactly so). A timed-out request is never repeated.

    Args:
        address: ``host:port`` of the server.
        options: The pipe's options (default: this package's ``KV_PIPE_OPTIONS``): ``timeout_s`` is the
            default bound on one request beyond the query's own ``wait_s``, ``device`` where received
            tensors land by default, ``auth`` how to authenticate (None reads ``UCXKV_AUTH``).
        timeout_s, peer_timeout_s, heartbeat_s, device, auth: Conveniences that override ``options`` when given.
        redial: Reconnect after a failure instead of staying broken.
    """

    def __init__(self, address: str, *, options: Optional[PipeOptions] = None, timeout_s: Optional[float] = None,
                 peer_timeout_s: Optional[float] = None, heartbeat_s: Optional[float] = None, device: Any = None,
                 name: Optional[str] = None, meta: Optional[Dict[str, str]] = None, auth: Optional[Auth] = None,
                 redial: bool = False):
        self.address = address
        self.options = PipeOptions.of(options or KV_PIPE_OPTIONS, timeout_s=timeout_s, peer_timeout_s=peer_timeout_s,
                                      heartbeat_s=heartbeat_s, device=device, auth=auth)
        self.timeout_s = float(self.options.timeout_s)
        self.device = torch.device(self.options.device)  # (converted once, not at every receive)
        self.redial = bool(redial)
        self.redials = 0  # connections made after the first one
        self._dial_kw = dict(name=name, service=SERVICE, meta=meta, options=self.options)
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._broken: Optional[str] = None
        self._closed = False
        self._pipe = self._dial()

    def _dial(self) -> Pipe:
        try:
            return Pipe.connect(self.address, **self._dial_kw)
        except TransportError as exc:
            raise PeerUnavailableError(f"cannot reach lookup server {self.address}: {exc}") from exc

    def _redial_locked(self, why: str) -> None:
        log.info("lookup client: redialling %s after: %s", self.address, why)
        self._pipe.close()
        self._broken = f"redial failed after: {why}"
        self._pipe = self._dial()  # raises PeerUnavailableError; the client stays broken
        self._broken = None
        self.redials += 1

    def _rpc(self, msg: Any, tensors: Sequence[Any], timeout: float, device: Any) -> tuple:
        with self._lock:
            if self._closed:
                raise KVUsageError(f"lookup client to {self.address} is closed")
            fresh = False
            if self._broken is not None:
                if not self.redial:
                    raise PeerUnavailableError(f"lookup client to {self.address} is broken: {self._broken}")
                self._redial_locked(self._broken)
                fresh = True
            try:
                ans, rest = self._exchange_locked(msg, tensors, timeout, device)
            except PeerUnavailableError as exc:
                if not (self.redial and not fresh and isinstance(exc.__cause__, TransportError)
                        and not isinstance(exc.__cause__, PeerTimeoutError)):
                    raise
                self._redial_locked(str(exc))  # a connection from before a producer restart: once more
                ans, rest = self._exchange_locked(msg, tensors, timeout, device)
        if isinstance(ans, wire.ErrorReply):
            cls = WireVersionError if ans.code == "version" else ProducerError
            raise cls(f"lookup server {self.address} refused {type(msg).__name__} #{msg.seq}: "
                      f"[{ans.code}] {ans.message}")
        if getattr(ans, "seq", None) != msg.seq:
            self._broken = "answer out of order"
            raise LookupProtocolError(f"lookup server {self.address} answered #{ans.seq}, expected #{msg.seq}")
        return ans, rest

    def _exchange_locked(self, msg: Any, tensors: Sequence[Any], timeout: float, device: Any) -> tuple:
        """Send one request and receive its answer; a failure marks the client broken."""
        try:
            self._pipe.send_message(wire.encode(msg), tensors, timeout=timeout)
            # one envelope: one header for every tensor, then their payloads back to back
            body, rest = self._pipe.recv_message(device, timeout=timeout)
            ans = wire.decode_response(body, self.address)
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
        return ans, rest

    def fetch(self, input_tokens: Optional[torch.Tensor] = None, roi: Optional[torch.Tensor] = None, *,
              request_id: Optional[str] = None, prefix: bool = False, min_prefix: int = 1, wait_s: float = 0.0,
              device: Any = None, timeout: Optional[float] = None, narrow: Optional[List[int]] = None,
              readers: int = 1) -> Optional[Match]:
        """Select and drop the matching entry on the producer; None if nothing matched within ``wait_s``.

        The whole call is bounded by ``wait_s + timeout`` (``timeout`` defaults
        to the client's ``timeout_s``). Tensors land on ``device``. ``narrow``
        and ``readers``: see :meth:`LookupBuffer.fetch` (the producer narrows,
        so only the asked range crosses the wire). Where the entry's tokens are
        the query's own (an exact match, no roi on either side, the same dtype
        and shape), they do not come back over the wire: ``input_tokens`` of the
        match is the query tensor itself (moved to ``device`` if it is elsewhere),
        as a local :class:`LookupBuffer` hands out its stored tensors.

        Raises:
            KVUsageError: bad query; PeerUnavailableError: the producer is
            unreachable or silent; ProducerError: it refused the query.
        """
        check_query(input_tokens, roi, "drop_select")
        if input_tokens is None and request_id is None:
            raise KVUsageError("drop_select: a query needs input_tokens or a request_id")
        t = (self.timeout_s if timeout is None else timeout) + max(0.0, wait_s)
        check_readers(readers)
        msg = wire.Fetch(next(self._seq), request_id, bool(prefix), int(min_prefix), float(wait_s),
                         None if narrow is None else [int(v) for v in narrow], readers)
        dev = self.device if device is None else device
        ans, rest = self._rpc(msg, [input_tokens, roi], t, dev)
        if isinstance(ans, wire.NotFound):
            return None
        if not isinstance(ans, wire.Found) or len(rest) < 2 or len(ans.parts) != 3:
            raise LookupProtocolError(f"lookup server {self.address} sent a malformed answer to Fetch #{msg.seq}")
        # (raises LookupProtocolError when the parts describe another number of tensors than arrived)
        key, value, hidden = wire.unflatten_parts(ans.parts, rest[2:], self.address)
        tokens = rest[0]
        if ans.echo:  # the entry's tokens are the ones this query sent (see wire.Found.echo)
            if tokens is not None or input_tokens is None or roi is not None:
                raise LookupProtocolError(f"lookup server {self.address} sent a malformed answer to Fetch "
                                          f"#{msg.seq}: echo of the query's tokens with "
                                          f"{'tokens' if tokens is not None else 'no query tokens or a roi'}")
            tokens = input_tokens.to(dev)  # (itself where it already is on dev)
        return Match(tokens, rest[1], key, value, hidden, ans.matched, ans.request_id)

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

    def __init__(self, clients: Sequence[KVSource], *, own: bool = True):
        if not clients:
            raise KVUsageError("MultiProducerClient needs at least one client")
        self.clients = list(clients)
        self._own = own
        self._next = 0

    @classmethod
    def connect(cls, addresses: Sequence[str], *, options: Optional[PipeOptions] = None, redial: bool = False,
                name: Optional[str] = None) -> "MultiProducerClient":
        """A client of every producer in ``addresses``, each pipe built from the same ``options`` (owned)."""
        clients: List[LookupClient] = []
        try:
            for a in addresses:
                clients.append(LookupClient(a, options=options, redial=redial, name=name))
        except BaseException:
            for c in clients:
                c.close()
            raise
        return cls(clients, own=True)

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