"""ZeroMQ control plane: handshakes, liveness, and orderly goodbyes.

A :class:`ControlServer` owns one ROUTER socket and one thread. It decodes every
incoming message with :mod:`._wire`, answers malformed ones with a
:class:`Reject` and keeps serving. A :func:`dial` on the other side performs the
handshake over a DEALER socket and hands back a :class:`Link`; from then on both
ends send :class:`Heartbeat` every ``heartbeat_s`` and consider the peer dead
after ``peer_timeout_s`` of silence, or closed when a :class:`Goodbye` arrives.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import zmq

from . import _wire
from ._wire import Goodbye, Heartbeat, Hello, Reject, Welcome
from .errors import LocalUsageError, PeerRejectedError, PeerTimeoutError, RemoteProtocolError, TransportError

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
PEER_TIMEOUT_S = 10.0
_MAX_FRAME = _wire.MAX_CONTROL_BODY + 1024


def parse_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` allowed); raises :class:`LocalUsageError` on bad input."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise LocalUsageError(f"bad address {address!r}: expected host:port")
    return host.strip("[]"), int(port)


def _tcp(host: str, port: int | str) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


class Link:
    """One end's view of an established peer: who it is and whether it still answers."""

    def __init__(self, peer: str, heartbeat_s: float, peer_timeout_s: float):
        self.peer = peer
        self.heartbeat_s = heartbeat_s
        self.peer_timeout_s = peer_timeout_s
        self.last_heard = time.monotonic()
        self.closed_reason: str | None = None  # set when the peer said goodbye
        self.peer_sent = -1  # what the Goodbye said the peer had sent
        self.local_closed = False
        self.hello: Hello | None = None
        self.welcome: Welcome | None = None

    def heard(self) -> None:
        self.last_heard = time.monotonic()

    def problem(self) -> str | None:
        """None while the peer is healthy; otherwise why it is not."""
        if self.closed_reason is not None:
            return f"peer {self.peer} closed its end ({self.closed_reason or 'no reason given'})"
        silent = time.monotonic() - self.last_heard
        if silent > self.peer_timeout_s:
            return f"peer {self.peer} silent for {silent:.1f}s (peer timeout {self.peer_timeout_s:.1f}s): dead or frozen"
        return None


HelloHandler = Callable[[Hello, Link], Welcome | Reject]


class _Sock:
    """Shared socket options: bounded frames, no linger, keepalive."""

    @staticmethod
    def configure(sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, _MAX_FRAME)
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)


class ControlServer:
    """A ROUTER socket on ``host:port`` (port 0 picks one) served by one thread.

    ``on_hello`` decides whether to accept a peer; it returns a :class:`Welcome`
    (a :class:`Link` to that peer is kept) or a :class:`Reject`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        on_hello: HelloHandler,
        *,
        heartbeat_s: float = HEARTBEAT_S,
        peer_timeout_s: float = PEER_TIMEOUT_S,
        name: str = "ucxkv",
    ):
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        _Sock.configure(self._sock)
        if ":" in host:
            self._sock.setsockopt(zmq.IPV6, 1)
        try:
            self._sock.bind(_tcp(host, port if port else "*"))
            port = int(self._sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        except zmq.ZMQError as exc:
            self._sock.close(0)
            self._ctx.term()
            raise LocalUsageError(f"cannot listen on {host}:{port}: {exc}") from exc
        self.host, self.port = host, port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._on_hello = on_hello
        self._hb, self._timeout = heartbeat_s, peer_timeout_s
        self._links: dict[bytes, Link] = {}
        self._outbox: list[tuple[bytes, list[bytes]]] = []
        self._outbox_lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.rejected = 0
        self._thread = threading.Thread(target=self._run, name=f"{name}-control:{port}", daemon=True)
        self._thread.start()
        self._ready.wait(5.0)

    def links(self) -> list[Link]:
        return list(self._links.values())

    def say_goodbye(self, link: Link, reason: str, sent: int = -1) -> None:
        """Queue a Goodbye to ``link``'s peer (sent by the server thread)."""
        for ident, l in list(self._links.items()):
            if l is link:
                link.local_closed = True
                with self._outbox_lock:
                    self._outbox.append((ident, _wire.encode(Goodbye(reason, sent))))

    def _send(self, ident: bytes, frames: list[bytes]) -> None:
        try:
            self._sock.send_multipart([ident, *frames], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("control send to %r failed: %s", ident, exc)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        self._ready.set()
        next_hb = time.monotonic()
        try:
            while not self._stop.is_set():
                if poller.poll(int(min(self._hb, 0.1) * 1000)):
                    while True:
                        try:
                            frames = self._sock.recv_multipart(flags=zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(frames)
                with self._outbox_lock:
                    out, self._outbox = self._outbox, []
                for ident, frames in out:
                    self._send(ident, frames)
                now = time.monotonic()
                if now >= next_hb:
                    next_hb = now + self._hb
                    for ident, link in list(self._links.items()):
                        if link.local_closed:
                            del self._links[ident]
                        elif link.closed_reason is None:
                            self._send(ident, _wire.encode(Heartbeat()))
        except Exception:  # noqa: BLE001 - never die silently
            log.exception("control server %s crashed", self.address)
        finally:
            for ident, link in self._links.items():
                if link.closed_reason is None:
                    self._send(ident, _wire.encode(Goodbye("listener closed")))
            self._sock.close(0)

    def _handle(self, frames: list[bytes]) -> None:
        ident, body = frames[0], frames[1:]
        link = self._links.get(ident)
        peer = link.peer if link else f"client {ident.hex()[:16]} at {self.address}"
        try:
            msg = _wire.decode(body, peer)
        except TransportError as exc:
            self.rejected += 1
            log.warning("rejected control message: %s", exc)
            code = "version" if "version" in str(exc) else "malformed"
            self._send(ident, _wire.encode(Reject(code, str(exc))))
            return
        if link is not None:
            link.heard()
        if isinstance(msg, Hello):
            if link is not None:
                self._send(ident, _wire.encode(Reject("protocol", "duplicate Hello on an established link")))
                return
            new = Link(msg.name or peer, self._hb, self._timeout)
            new.hello = msg
            try:
                answer = self._on_hello(msg, new)
            except Exception as exc:  # noqa: BLE001 - a handler bug must not kill the server
                log.exception("hello handler failed for %s", msg.name)
                answer = Reject("internal", f"listener failed to accept: {exc}")
            if isinstance(answer, Welcome):
                new.welcome = answer
                self._links[ident] = new
            else:
                self.rejected += 1
            self._send(ident, _wire.encode(answer))
        elif isinstance(msg, Goodbye):
            if link is not None:
                link.peer_sent = msg.sent
                link.closed_reason = msg.reason
                del self._links[ident]
        elif isinstance(msg, Heartbeat):
            if link is None:
                self._send(ident, _wire.encode(Reject("protocol", "heartbeat before Hello")))
        else:
            self.rejected += 1
            self._send(ident, _wire.encode(Reject("protocol", f"unexpected {type(msg).__name__} at a listener")))

    def close(self) -> None:
        """Stop the thread and close the socket (idempotent, bounded)."""
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(timeout=5.0)
            self._ctx.term()


class ClientLink(Link):
    """The dialling side's link; owns its DEALER socket and heartbeat thread."""

    def __init__(self, ctx: zmq.Context, sock: zmq.Socket, peer: str, heartbeat_s: float, peer_timeout_s: float):
        super().__init__(peer, heartbeat_s, peer_timeout_s)
        self._ctx, self._sock = ctx, sock
        self._stop = threading.Event()
        self._goodbye: str | None = None
        self._goodbye_sent = -1
        self._thread = threading.Thread(target=self._run, name=f"ucxkv-link:{peer}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_hb = 0.0
        try:
            while not self._stop.is_set():
                if self._sock.poll(int(min(self.heartbeat_s, 0.1) * 1000)):
                    try:
                        frames = self._sock.recv_multipart(flags=zmq.NOBLOCK)
                        msg = _wire.decode(frames, self.peer)
                    except zmq.Again:
                        continue
                    except TransportError as exc:
                        log.warning("ignoring bad control message: %s", exc)
                        continue
                    self.heard()
                    if isinstance(msg, Goodbye):
                        self.peer_sent = msg.sent
                        self.closed_reason = msg.reason
                now = time.monotonic()
                if now >= next_hb and self.closed_reason is None:
                    next_hb = now + self.heartbeat_s
                    try:
                        self._sock.send_multipart(_wire.encode(Heartbeat()), flags=zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass
        finally:
            if self._goodbye is not None and self.closed_reason is None:
                try:
                    self._sock.send_multipart(_wire.encode(Goodbye(self._goodbye, self._goodbye_sent)), flags=zmq.NOBLOCK)
                    time.sleep(0.01)
                except zmq.ZMQError:
                    pass
            self._sock.close(0)

    def close(self, reason: str = "closed", sent: int = -1) -> None:
        """Say goodbye and stop (idempotent, bounded)."""
        if not self._stop.is_set():
            self.local_closed = True
            self._goodbye = reason
            self._goodbye_sent = sent
            self._stop.set()
            self._thread.join(timeout=5.0)
            self._ctx.term()


def dial(
    address: str,
    hello: Hello,
    *,
    timeout_s: float,
    heartbeat_s: float = HEARTBEAT_S,
    peer_timeout_s: float = PEER_TIMEOUT_S,
) -> tuple[ClientLink, Welcome]:
    """Handshake with the listener at ``address``; return the live link and its Welcome.

    Raises :class:`PeerTimeoutError` when nothing answers within ``timeout_s``,
    :class:`PeerRejectedError` when the listener refuses, and
    :class:`RemoteProtocolError` when its answer is malformed.
    """
    host, port = parse_address(address)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    _Sock.configure(sock)
    if ":" in host:
        sock.setsockopt(zmq.IPV6, 1)
    ok = False
    try:
        sock.connect(_tcp(host, port))
        sock.send_multipart(_wire.encode(hello))
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000)):
                raise PeerTimeoutError(
                    f"no handshake answer from {address} within {timeout_s:.1f}s: is a ucxkv listener running there?"
                )
            msg = _wire.decode(sock.recv_multipart(), address)
            if isinstance(msg, Heartbeat):
                continue
            if isinstance(msg, Reject):
                raise PeerRejectedError(f"{address} rejected our handshake ({msg.code}): {msg.reason}")
            if not isinstance(msg, Welcome):
                raise RemoteProtocolError(f"{address} answered Hello with {type(msg).__name__}, expected Welcome")
            link = ClientLink(ctx, sock, f"{msg.name}@{address}" if msg.name else address, heartbeat_s, peer_timeout_s)
            link.welcome = msg
            ok = True
            return link, msg
    finally:
        if not ok:
            sock.close(0)
            ctx.term()
