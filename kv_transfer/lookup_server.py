"""Serves a LookupBuffer to remote consumers: a PipeListener, one handler thread per consumer, a lease reaper.

A match is answered with the stored tensors themselves (zero copy). A handler
answers a bad message with an :class:`ErrorReply` and keeps serving; a consumer
that dies or closes ends only its own handler, and an entry whose send failed
becomes available again (its lease still runs).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, List, Optional

from transport import PeerError, PeerTimeoutError, Pipe, PipeListener, PipeOptions, RemoteProtocolError
from transport import _cuda_order
from transport._envelope import clip as _clip
from transport.auth import Auth

from . import _lookup_wire as wire
from ._serving import KV_PIPE_OPTIONS, accept_loop, stop_serving
from .errors import KVTransferError, KVUsageError, LookupProtocolError, WireVersionError
from .lookup_source import narrow_part

if TYPE_CHECKING:  # pragma: no cover
    from .lookup_store import LookupBuffer

log = logging.getLogger(__name__)

__all__ = ["LookupServer", "SERVICE"]

#: The service name consumers ask for in their Hello.
SERVICE = "kvlookup"


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
        options: The listener's pipe options (default: this package's ``KV_PIPE_OPTIONS``); a
            request's tensors are capped at :data:`MAX_REQUEST_TENSOR_BYTES` whatever it says.
        timeout_s, peer_timeout_s, heartbeat_s, auth: Conveniences that override ``options`` when given
            (``auth``: who may connect, a ``transport.auth.Auth``; None reads ``UCXKV_AUTH``).
    """

    SERVICE = SERVICE

    def __init__(self, buffer: "LookupBuffer", host: str = "127.0.0.1", port: int = 0, *, max_wait_s: float = 60.0,
                 send_timeout_s: float = 30.0, options: Optional[PipeOptions] = None,
                 timeout_s: Optional[float] = None, peer_timeout_s: Optional[float] = None,
                 heartbeat_s: Optional[float] = None, reap_interval_s: float = 0.25, name: Optional[str] = None,
                 auth: Optional[Auth] = None):
        self.buffer = buffer
        self.max_wait_s = float(max_wait_s)
        self.send_timeout_s = float(send_timeout_s)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pipes: List[Pipe] = []
        self._threads: List[threading.Thread] = []
        self.served = 0  # answers with a match that were delivered
        self.failed_sends = 0
        opts = PipeOptions.of(options or KV_PIPE_OPTIONS, timeout_s=timeout_s, peer_timeout_s=peer_timeout_s,
                              heartbeat_s=heartbeat_s, auth=auth)
        opts = opts.replace(max_tensor_bytes=min(opts.max_tensor_bytes, wire.MAX_REQUEST_TENSOR_BYTES))
        self._listener = PipeListener(host, port, name=name, service=self.SERVICE, options=opts)
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
        ready.set()
        accept_loop(self._listener, self._stop, self._lock, self._pipes, self._threads, self._serve_pipe, "kvlookup")

    def _reap_loop(self) -> None:
        while not self._stop.wait(self._reap_interval_s):
            try:
                self.buffer.expire()
            except Exception:  # noqa: BLE001 - keep reaping
                log.exception("lookup server %s: lease reaper failed", self.address)

    def _serve_pipe(self, pipe: Pipe) -> None:
        peer = pipe.peer
        log.info("lookup server %s: consumer %s connected", self.address, peer)
        try:
            while not self._stop.is_set():
                try:
                    # the envelope's header states how many tensors follow: more than any request
                    # carries is refused before one of them is received
                    body, tensors = pipe.recv_message(timeout=1.0, max_tensors=wire.MAX_REQUEST_TENSORS)
                except PeerTimeoutError:
                    continue  # nothing yet; the receive stays posted
                except RemoteProtocolError as exc:
                    if pipe.refused is None:
                        raise  # the pipe broke: nothing to answer on
                    # out of step: answer, then drop this consumer only
                    log.warning("lookup server %s: %s; closing that pipe", self.address, exc)
                    pipe.send_message(wire.encode(wire.ErrorReply(-1, "protocol", str(exc))),
                                      timeout=self.send_timeout_s)
                    break
                try:
                    msg = wire.decode_request(body, len(tensors), peer)
                except LookupProtocolError as exc:
                    code = "version" if isinstance(exc, WireVersionError) else "protocol"
                    log.warning("lookup server %s: %s", self.address, exc)
                    pipe.send_message(wire.encode(wire.ErrorReply(-1, code, str(exc))), timeout=self.send_timeout_s)
                    continue  # its tensors were received with it: the pipe is in step
                if not self._handle(pipe, msg, tensors):
                    break
        except PeerError as exc:
            log.info("lookup server %s: consumer %s gone: %s", self.address, peer, exc)
        except RemoteProtocolError as exc:  # the consumer's fault: one line, never a traceback per request
            log.warning("lookup server %s: dropped consumer %s: %s", self.address, peer, _clip(str(exc)))
        except Exception:  # noqa: BLE001 - one consumer's failure must not kill the server
            if self._stop.is_set():
                return  # close() closed this pipe under the handler: the expected way out
            log.exception("lookup server %s: handler for %s failed", self.address, peer)
        finally:
            with self._lock:
                if pipe in self._pipes:
                    self._pipes.remove(pipe)
            pipe.close()

    def _handle(self, pipe: Pipe, msg: Any, tensors: List[Any]) -> bool:
        """Answer one decoded request; False when the pipe must be dropped."""
        peer = pipe.peer
        if isinstance(msg, wire.Stats):
            s = self.buffer.stats()
            pipe.send_message(wire.encode(wire.StatsReply(msg.seq, s["bytes_used"], s["num_entries"],
                                                           s["capacity_bytes"])), timeout=self.send_timeout_s)
            return True
        if isinstance(msg, wire.Abort):
            n = self.buffer.abort(msg.request_id)
            pipe.send_message(wire.encode(wire.AbortReply(msg.seq, n)), timeout=self.send_timeout_s)
            return True
        # Fetch
        if len(tensors) != 2:
            err = wire.ErrorReply(msg.seq, "malformed", f"Fetch must be followed by 2 tensors, got {len(tensors)}")
            pipe.send_message(wire.encode(err), timeout=self.send_timeout_s)
            return True
        tokens, roi = tensors
        try:
            hit = self.buffer.claim(tokens, roi, request_id=msg.request_id, prefix=msg.prefix,
                                    min_prefix=msg.min_prefix, wait_s=min(max(0.0, msg.wait_s), self.max_wait_s),
                                    cancel=self._stop, readers=msg.readers)
        except KVUsageError as exc:
            pipe.send_message(wire.encode(wire.ErrorReply(msg.seq, "bad_query", str(exc))),
                              timeout=self.send_timeout_s)
            return True
        if hit is None:
            pipe.send_message(wire.encode(wire.NotFound(msg.seq)), timeout=self.send_timeout_s)
            return True
        handle, m = hit
        _cuda_order.wait(handle.written)  # the kernels that wrote its device tensors, before UCX reads them
        key = m.key
        if msg.narrow is not None:
            try:
                key = narrow_part(key, msg.narrow, f"Fetch from {peer}")
            except KVUsageError as exc:
                self.buffer.unclaim(handle)
                pipe.send_message(wire.encode(wire.ErrorReply(msg.seq, "bad_query", str(exc))),
                                  timeout=self.send_timeout_s)
                return True
        codes, flat = wire.flatten_parts([key, m.value, m.hidden])
        # the consumer has these tokens already: it sent them (see wire.Found.echo)
        stored = m.input_tokens
        echo = (roi is None and m.roi is None and not msg.prefix and tokens is not None and stored is not None
                and stored.dtype == tokens.dtype and stored.shape == tokens.shape)
        head = wire.encode(wire.Found(msg.seq, m.matched, codes, m.request_id, echo))
        try:  # one envelope: one header for tokens, roi and every layer's tensors, then the payloads
            pipe.send_message(head, [None if echo else stored, m.roi, *flat], timeout=self.send_timeout_s)
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
        if not stop_serving(self._listener, self._stop, self._lock, self._pipes, self._threads, timeout):
            return
        log.info("lookup server %s closed", self.address)

    def __enter__(self) -> "LookupServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
