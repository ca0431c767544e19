"""ZeroMQ control plane: handshakes, liveness, and orderly goodbyes.

Why one file of ~540 lines: both ends of one handshake (server, dial, the
links) share its proofs, socket settings and liveness rules and are never used
apart.

A :class:`ControlServer` owns one ROUTER socket and one thread. It decodes every
incoming message with :mod:`._wire`, answers malformed ones with a
:class:`Reject` and keeps serving. A :func:`dial` on the other side performs the
handshake over a DEALER socket and hands back a :class:`Link`; from then on both
ends send :class:`Heartbeat` every ``heartbeat_s`` and consider the peer dead
after ``peer_timeout_s`` of silence, or closed when a :class:`Goodbye` arrives.

Authentication (:mod:`.auth`, off by default) gates the Welcome: with a shared
secret the handshake becomes Hello(nonce) -> Challenge -> Hello(proof) ->
Welcome(proof); with CURVE the sockets are encrypted and a ZAP handler served
by the same thread admits only the configured client keys. Shared-secret mode
runs CURVE too, with key pairs derived from the secret: either way a peer
without credentials fails the ZeroMQ handshake, so libzmq buffers nothing it
sends (a message's parts are buffered invisibly to us until its last part, and
``MAXMSGSIZE`` bounds a part, not a message).
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import threading
import time
from collections import OrderedDict
from typing import Callable

import msgspec
import zmq
import zmq.utils.monitor
import zmq.utils.z85

from . import _wire
from ._options import PipeOptions
from ._wakeup import Wakeup
from ._wire import Challenge, Goodbye, Heartbeat, Hello, Reject, Welcome
from .auth import NONCE_BYTES, Auth
from .errors import (LocalUsageError, PeerRejectedError, PeerTimeoutError, RemoteProtocolError, TransportError,
                     VersionMismatchError)

log = logging.getLogger(__name__)

_MAX_FRAME = _wire.MAX_CONTROL_BODY + 1024
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_MAX_PENDING_CHALLENGES = 1024
_CHALLENGE_TTL_S = 30.0


# -- shared-secret proofs: each binds both nonces and what the message hands over --
def _challenge_proof(auth: Auth, cn: bytes, sn: bytes) -> bytes:
    return auth.mac(b"ucxkv-challenge-v1", cn, sn)


def _hello_proof(auth: Auth, hello: Hello, sn: bytes) -> bytes:
    return auth.mac(b"ucxkv-hello-v1", hello.auth_nonce, sn, hello.worker_address, str(hello.recv_tag).encode(),
                    hello.service.encode(), hello.role.encode(), hello.name.encode())


def _welcome_proof(auth: Auth, welcome: Welcome, cn: bytes, sn: bytes) -> bytes:
    return auth.mac(b"ucxkv-welcome-v1", cn, sn, welcome.worker_address, str(welcome.recv_tag).encode(),
                    welcome.role.encode(), welcome.name.encode())


def _curve_server(auth: Auth) -> tuple[bytes, bytes, frozenset] | None:
    """(public, secret, admitted client keys) for a CURVE listener, None when ``auth`` runs no CURVE."""
    if auth.mode == "curve":
        return auth.curve_public, auth.curve_secret, auth.curve_clients
    if auth.mode == "secret":
        public, secret = auth.derived_curve("server")
        return public, secret, frozenset([auth.derived_curve("client")[0]])
    return None


def _curve_client(auth: Auth) -> tuple[bytes, bytes, bytes] | None:
    """(public, secret, server key) for a CURVE dialler, None when ``auth`` runs no CURVE."""
    if auth.mode == "curve":
        return auth.curve_public, auth.curve_secret, auth.curve_server_key
    if auth.mode == "secret":
        return *auth.derived_curve("client"), auth.derived_curve("server")[0]
    return None


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
        self.closed_at = 0.0  # when (time.monotonic)
        self.peer_sent = -1  # what the Goodbye said the peer had sent
        self.local_closed = False
        #: called once (from the control thread) when :meth:`problem` first has something to say (a
        #: Goodbye, a Reject, or silence past the peer timeout): whoever waits on this peer looks now,
        #: not at its next tick
        self.on_problem: Callable[[], None] | None = None
        self._told = False

    def peer_closed(self, reason: str, sent: int | None = None) -> None:
        """Record that the peer closed its end (a Goodbye, or a Reject of the link) and tell ``on_problem``."""
        if sent is not None:
            self.peer_sent = sent
        self.closed_at = time.monotonic()
        self.closed_reason = reason
        self.tell()

    def tell(self) -> None:
        """Call ``on_problem`` if the peer has a problem and it was not called yet (control thread)."""
        if self.on_problem is None or self._told or self.problem() is None:
            return
        self._told = True
        try:
            self.on_problem()
        except Exception:  # noqa: BLE001 - the control thread must go on
            log.exception("link to %s: on_problem failed", self.peer)

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


def _poll_ms(next_due: float) -> int:
    """Milliseconds from now to ``next_due`` (a ``time.monotonic`` value), at least 1."""
    return max(1, int((next_due - time.monotonic()) * 1000) + 1)


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
        options: PipeOptions,
        name: str = "ucxkv",
    ):
        """Bind ``host:port``; ``options`` gives the heartbeat, the peer timeout and who may connect (``auth``)."""
        self.auth = Auth.resolve(options.auth)
        if self.auth.mode == "curve" and not self.auth.curve_clients:
            raise LocalUsageError("CURVE listener needs the public keys of the clients it admits (clients=..., "
                                  "or UCXKV_CURVE_CLIENTS=dir of *.key certificates)")
        self._ctx = zmq.Context()
        self._zap: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._sock = self._ctx.socket(zmq.ROUTER)
        _Sock.configure(self._sock)
        if ":" in host:
            self._sock.setsockopt(zmq.IPV6, 1)
        if not self.auth.enabled and not _is_loopback(host):
            if not self.auth.explicit:
                raise LocalUsageError(
                    f"refusing to listen on {host}:{port} without authentication: anyone who can reach a "
                    "non-loopback address could fetch KV. Set UCXKV_AUTH=secret and UCXKV_SECRET_FILE (the same "
                    "on every node; or UCXKV_AUTH=curve), or turn authentication off explicitly on a trusted "
                    "network with UCXKV_AUTH=none or auth=Auth.none() (docs/reliability.md)")
            log.warning("control plane on %s:%d without authentication (turned off explicitly): anyone who can "
                        "reach this port can fetch KV; set UCXKV_AUTH=secret|curve (docs/reliability.md)",
                        host, port)
        curve = _curve_server(self.auth)
        self._admitted = curve[2] if curve else frozenset()
        try:
            if curve is not None:
                # The ZAP handler must exist before the first client handshakes; this thread serves it.
                self._zap = self._ctx.socket(zmq.REP)
                self._zap.setsockopt(zmq.LINGER, 0)
                self._zap.bind(_ZAP_ENDPOINT)
                self._sock.curve_publickey, self._sock.curve_secretkey = curve[0], curve[1]
                self._sock.curve_server = True
                # handshakes that fail before ZAP is asked (a key from another secret, no CURVE at all)
                self._monitor = self._sock.get_monitor_socket(_HANDSHAKE_FAILED & ~_HANDSHAKE_FAILED_AUTH)
                self._sock.zap_domain = b"ucxkv"
            self._sock.bind(_tcp(host, port if port else "*"))
            port = int(self._sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        except zmq.ZMQError as exc:
            self._close_sockets()
            self._ctx.term()
            raise LocalUsageError(f"cannot listen on {host}:{port}: {exc}") from exc
        self._challenges: OrderedDict[bytes, tuple[bytes, bytes, float]] = OrderedDict()
        self.host, self.port = host, port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._on_hello = on_hello
        self._hb, self._timeout = options.heartbeat_s, options.peer_timeout_s
        self._links: dict[bytes, Link] = {}
        self._outbox: list[tuple[bytes, list[bytes]]] = []
        self._outbox_lock = threading.Lock()
        self._stop = threading.Event()
        self._wakeup = Wakeup()  # say_goodbye and close wake the thread at once
        self._ready = threading.Event()
        self.rejected = 0
        self.auth_failures = 0
        self._thread = threading.Thread(target=self._run, name=f"{name}-control:{port}", daemon=True)
        self._thread.start()
        self._ready.wait(5.0)

    def say_goodbye(self, link: Link, reason: str, sent: int = -1) -> None:
        """Queue a Goodbye to ``link``'s peer (sent by the server thread)."""
        for ident, l in list(self._links.items()):
            if l is link:
                link.local_closed = True
                with self._outbox_lock:
                    self._outbox.append((ident, _wire.encode(Goodbye(reason, sent))))
                self._wakeup.set()

    def _send(self, ident: bytes, frames: list[bytes]) -> None:
        try:
            self._sock.send_multipart([ident, *frames], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("control send to %r failed: %s", ident, exc)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        if self._zap is not None:
            poller.register(self._zap, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        poller.register(self._wakeup.fd, zmq.POLLIN)
        self._ready.set()
        next_hb = time.monotonic()
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(_poll_ms(next_hb)))
                if self._wakeup.fd in events:
                    self._wakeup.clear()
                if self._zap is not None and self._zap in events:
                    self._answer_zap()
                if self._monitor is not None and self._monitor in events:
                    self._handshake_failed()
                if self._sock in events:
                    while True:
                        try:
                            frames = self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=True)
                        except zmq.Again:
                            break
                        try:
                            self._handle(frames)
                        except Exception:  # noqa: BLE001 - one message must never end the server
                            self.rejected += 1
                            log.exception("control server %s: handling one message failed; still serving",
                                          self.address)
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
                            link.tell()  # silent past its timeout
        except Exception:  # noqa: BLE001 - never die silently
            log.exception("control server %s crashed", self.address)
        finally:
            for ident, link in self._links.items():
                if link.closed_reason is None:
                    self._send(ident, _wire.encode(Goodbye("listener closed")))
            self._close_sockets()

    def _close_sockets(self) -> None:
        if self._monitor is not None:
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(0)
        self._sock.close(0)
        if self._zap is not None:
            self._zap.close(0)

    def _handshake_failed(self) -> None:
        """A peer failed the CURVE handshake before ZAP was asked: counted and logged, nothing else."""
        try:
            ev = zmq.utils.monitor.recv_monitor_message(self._monitor, flags=zmq.NOBLOCK)
        except zmq.Again:
            return
        self.rejected += 1
        self.auth_failures += 1
        log.warning("control server %s: a peer failed the authenticated ZeroMQ handshake (%s, value %s)%s",
                    self.address, ev["event"], ev["value"],
                    ": wrong shared secret, or no authentication" if self.auth.mode == "secret" else "")

    def _answer_zap(self) -> None:
        """One ZAP request (RFC 27) from libzmq: admit a CURVE client whose public key was configured."""
        try:
            req = self._zap.recv_multipart(flags=zmq.NOBLOCK)
        except zmq.Again:
            return
        if len(req) < 6:
            return  # not a ZAP request; REP would wedge without an answer, so answer something
        version, request_id, _domain, address, _identity, mechanism = req[:6]
        ok = False
        if mechanism == b"CURVE" and len(req) >= 7 and len(req[6]) == 32:
            ok = zmq.utils.z85.encode(req[6]) in self._admitted
        if not ok:
            self.rejected += 1
            self.auth_failures += 1
            log.warning("control server %s refused a %s handshake from %s: %s", self.address,
                        _wire.clip(mechanism.decode(errors="replace"), 20), address.decode(errors="replace"),
                        "a key derived from another shared secret" if self.auth.mode == "secret"
                        else "unknown client key")
        self._zap.send_multipart([b"1.0", request_id, b"200" if ok else b"400",
                                  b"OK" if ok else b"unknown client key", b"", b""])

    def _check_secret(self, ident: bytes, msg: Hello) -> Challenge | Reject | bytes:
        """Shared-secret auth of a Hello: a Challenge to send, a Reject, or the server nonce once proven."""
        if not msg.auth_nonce:
            return Reject("auth", "this listener requires authentication (UCXKV_AUTH=secret) and the Hello "
                                  "carried none; configure the same secret on both sides")
        if len(msg.auth_nonce) != NONCE_BYTES:
            return Reject("auth", f"auth nonce is {len(msg.auth_nonce)} bytes, expected {NONCE_BYTES}")
        now = time.monotonic()
        while self._challenges and next(iter(self._challenges.values()))[2] < now:
            self._challenges.popitem(last=False)
        if not msg.auth_proof:
            sn = secrets.token_bytes(NONCE_BYTES)
            self._challenges[ident] = (msg.auth_nonce, sn, now + _CHALLENGE_TTL_S)
            self._challenges.move_to_end(ident)
            while len(self._challenges) > _MAX_PENDING_CHALLENGES:
                self._challenges.popitem(last=False)
            return Challenge(sn, _challenge_proof(self.auth, msg.auth_nonce, sn))
        pending = self._challenges.pop(ident, None)  # single use, whatever the outcome
        if pending is None or pending[0] != msg.auth_nonce:
            return Reject("auth", "authentication failed: no challenge outstanding for this connection "
                                  "(expired, or a replayed proof)")
        if not self.auth.verify(msg.auth_proof, b"ucxkv-hello-v1", msg.auth_nonce, pending[1], msg.worker_address,
                                str(msg.recv_tag).encode(), msg.service.encode(), msg.role.encode(),
                                msg.name.encode()):
            return Reject("auth", "authentication failed: wrong shared secret (UCXKV_SECRET differs)")
        return pending[1]

    def _handle(self, frames: list[bytes]) -> None:
        ident, body = frames[0], frames[1:]
        link = self._links.get(ident)
        peer = link.peer if link else f"client {ident.hex()[:16]} at {self.address}"
        try:
            msg = _wire.decode(body, peer)
        except TransportError as exc:
            self.rejected += 1
            reason = _wire.clip(str(exc))
            log.warning("rejected control message: %s", reason)
            code = "version" if isinstance(exc, VersionMismatchError) else "malformed"
            self._send(ident, _wire.encode(Reject(code, reason)))
            return
        if link is not None:
            link.heard()
        if isinstance(msg, Hello):
            if link is not None:
                self._send(ident, _wire.encode(Reject("protocol", "duplicate Hello on an established link")))
                return
            sn = b""
            if self.auth.mode == "secret":
                checked = self._check_secret(ident, msg)
                if isinstance(checked, Reject):
                    self.rejected += 1
                    self.auth_failures += 1
                    log.warning("control server %s: %s (from %s)", self.address, checked.reason,
                                _wire.clip(msg.name, 120) or peer)
                if not isinstance(checked, bytes):
                    self._send(ident, _wire.encode(checked))
                    return
                sn = checked
            new = Link(_wire.clip(msg.name, 120) or peer, self._hb, self._timeout)
            try:
                answer = self._on_hello(msg, new)
            except TransportError as exc:  # e.g. an unusable worker address: the peer's fault, said briefly
                log.warning("control server %s refused %s: %s", self.address, new.peer, _wire.clip(str(exc)))
                answer = Reject("malformed", _wire.clip(str(exc)))
            except Exception as exc:  # noqa: BLE001 - a handler bug must not kill the server
                log.exception("hello handler failed for %s", new.peer)
                answer = Reject("internal", _wire.clip(f"listener failed to accept: {exc}"))
            if isinstance(answer, Welcome):
                if sn:
                    answer = msgspec.structs.replace(
                        answer, auth_proof=_welcome_proof(self.auth, answer, msg.auth_nonce, sn))
                self._links[ident] = new
            else:
                self.rejected += 1
            self._send(ident, _wire.encode(answer))
        elif isinstance(msg, Goodbye):
            if link is not None:
                del self._links[ident]
                link.peer_closed(msg.reason, msg.sent)
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
            self._wakeup.set()
            self._thread.join(timeout=5.0)
            if self._thread.is_alive():
                log.warning("control server %s thread did not stop within 5s", self.address)
                return  # its sockets are still open; term() would block
            self._wakeup.close()
            self._ctx.term()


class ClientLink(Link):
    """The dialling side's link; owns its DEALER socket and heartbeat thread."""

    def __init__(self, ctx: zmq.Context, sock: zmq.Socket, peer: str, heartbeat_s: float, peer_timeout_s: float):
        super().__init__(peer, heartbeat_s, peer_timeout_s)
        self._ctx, self._sock = ctx, sock
        self._stop = threading.Event()
        self._wakeup = Wakeup()  # close wakes the thread at once
        self._goodbye: str | None = None
        self._goodbye_sent = -1
        self._thread = threading.Thread(target=self._run, name=f"ucxkv-link:{peer}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # The listener beats every heartbeat_s and this side answers each beat, so this thread wakes
        # once per beat (about 1-3 ms of CPU on a 2-core VM, docs/bench.md), not twice; it beats on
        # its own only when the listener fell silent for two beats (the listener must still hear us).
        last_sent = 0.0
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wakeup.fd, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(_poll_ms(last_sent + 2 * self.heartbeat_s)))
                if self._wakeup.fd in events:
                    self._wakeup.clear()
                beat = False
                if self._sock in events:
                    try:
                        frames = self._sock.recv_multipart(flags=zmq.NOBLOCK)
                        msg = _wire.decode(frames, self.peer)
                    except zmq.Again:
                        continue
                    except TransportError as exc:
                        log.warning("ignoring bad control message: %s", _wire.clip(str(exc)))
                        continue
                    if isinstance(msg, Reject):  # a listener that no longer knows this link (restarted)
                        self.peer_closed(f"listener rejected the link ({msg.code}: {_wire.clip(msg.reason)})")
                        continue
                    self.heard()
                    if isinstance(msg, Goodbye):
                        self.peer_closed(msg.reason, msg.sent)
                    beat = isinstance(msg, Heartbeat)
                self.tell()  # the listener silent past its timeout
                now = time.monotonic()
                if (now - last_sent >= 2 * self.heartbeat_s
                        or (beat and now - last_sent >= self.heartbeat_s / 2)):
                    last_sent = now  # (also once closed: the poll then sleeps two beats)
                    if self.closed_reason is None:
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
            self._wakeup.set()
            self._thread.join(timeout=5.0)
            if not self._thread.is_alive():
                self._wakeup.close()
            self._ctx.term()


_HANDSHAKE_FAILED_AUTH = getattr(zmq, "EVENT_HANDSHAKE_FAILED_AUTH", 0x4000)
_HANDSHAKE_FAILED = (
    getattr(zmq, "EVENT_HANDSHAKE_FAILED_NO_DETAIL", 0x0800)
    | getattr(zmq, "EVENT_HANDSHAKE_FAILED_PROTOCOL", 0x2000)
    | _HANDSHAKE_FAILED_AUTH
)


def _handshake_failed(address: str, auth: Auth, event: dict) -> str:
    """Why the ZeroMQ handshake with ``address`` failed, in words that say what to configure."""
    what = f"zmq event {event['event']!r}, value {event['value']}"
    if auth.mode == "none":
        return (f"{address} refused our handshake ({what}): it requires authentication and we have none "
                "configured (set UCXKV_AUTH=secret|curve like the listener, docs/reliability.md)")
    if auth.mode == "secret":
        return (f"authentication failed: {address} refused our shared-secret handshake or could not prove it "
                f"knows our secret ({what}): the secrets differ, or it runs another authentication mode or none")
    return (f"{address} refused our CURVE handshake ({what}): authentication failed; check that it admits our "
            "public key and that we have its right server key")


def dial(
    address: str,
    hello: Hello,
    *,
    options: PipeOptions,
) -> tuple[ClientLink, Welcome]:
    """Handshake with the listener at ``address``; return the live link and its Welcome.

    ``options`` gives the handshake's bound (``timeout_s``), the link's heartbeat
    and peer timeout, and how we prove who we are (``auth``).
    Raises :class:`PeerTimeoutError` when nothing answers within ``timeout_s``,
    :class:`PeerRejectedError` when the listener refuses (authentication
    included, or when it cannot prove the shared secret), and
    :class:`RemoteProtocolError` when its answer is malformed.
    """
    auth = Auth.resolve(options.auth)
    timeout_s, heartbeat_s, peer_timeout_s = options.timeout_s, options.heartbeat_s, options.peer_timeout_s
    if auth.mode == "curve" and not auth.curve_server_key:
        raise LocalUsageError("CURVE dial needs the listener's public key (server_key=..., or "
                              "UCXKV_CURVE_SERVER_CERT=its .key certificate)")
    host, port = parse_address(address)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    monitor: zmq.Socket | None = None
    _Sock.configure(sock)
    if ":" in host:
        sock.setsockopt(zmq.IPV6, 1)
    cn = b""
    if auth.mode == "secret":
        cn = secrets.token_bytes(NONCE_BYTES)
        hello = msgspec.structs.replace(hello, auth_nonce=cn, auth_proof=b"")
    ok = False
    try:
        curve = _curve_client(auth)
        if curve is not None:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = curve
        # a failed ZeroMQ handshake (refused credentials, or one side with authentication and the
        # other without: their security mechanisms differ) is an answer too, not a silence
        monitor = sock.get_monitor_socket(_HANDSHAKE_FAILED)
        sock.connect(_tcp(host, port))
        sock.send_multipart(_wire.encode(hello))
        deadline = time.monotonic() + timeout_s
        sn = b""
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if monitor is not None:
            poller.register(monitor, zmq.POLLIN)
        while True:
            left = deadline - time.monotonic()
            events = dict(poller.poll(int(left * 1000))) if left > 0 else {}
            if monitor is not None and monitor in events:
                raise PeerRejectedError(_handshake_failed(address, auth,
                                                          zmq.utils.monitor.recv_monitor_message(monitor)))
            if sock not in events:
                if auth.enabled:
                    hint = (f" (authentication is on here, mode {auth.mode}: a listener that refuses our "
                            "credentials or does not use them may stay silent)")
                else:
                    hint = (" (authentication is off here; a listener that requires it would have failed "
                            "the handshake at once: see UCXKV_AUTH)")
                raise PeerTimeoutError(
                    f"no handshake answer from {address} within {timeout_s:.1f}s: is a ucxkv listener running "
                    f"there?{hint}"
                )
            msg = _wire.decode(sock.recv_multipart(), address)
            if isinstance(msg, Heartbeat):
                continue
            if isinstance(msg, Reject):
                raise PeerRejectedError(f"{address} rejected our handshake ({_wire.clip(msg.code, 40)}): "
                                        f"{_wire.clip(msg.reason)}")
            if isinstance(msg, Challenge):
                if auth.mode != "secret":
                    raise PeerRejectedError(
                        f"{address} requires shared-secret authentication and we have none configured "
                        "(set UCXKV_AUTH=secret and UCXKV_SECRET_FILE, or pass auth=Auth.secret(...))")
                if sn or len(msg.nonce) != NONCE_BYTES or not auth.verify(
                        msg.proof, b"ucxkv-challenge-v1", cn, msg.nonce):
                    raise PeerRejectedError(
                        f"authentication failed: {address} could not prove it knows our shared secret, so we "
                        "refuse it (the secrets differ, or it is not the listener we meant)")
                sn = msg.nonce
                hello = msgspec.structs.replace(hello, auth_proof=_hello_proof(auth, hello, sn))
                sock.send_multipart(_wire.encode(hello))
                continue
            if not isinstance(msg, Welcome):
                raise RemoteProtocolError(f"{address} answered Hello with {type(msg).__name__}, expected Welcome")
            if auth.mode == "secret" and (
                    not sn or not auth.verify(msg.auth_proof, b"ucxkv-welcome-v1", cn, sn, msg.worker_address,
                                              str(msg.recv_tag).encode(), msg.role.encode(), msg.name.encode())):
                try:
                    sock.send_multipart(_wire.encode(Goodbye("authentication failed")), flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
                raise PeerRejectedError(
                    f"authentication failed: {address} sent a Welcome without a valid shared-secret proof "
                    "(authentication is off there, or its secret differs); refusing it")
            if monitor is not None:
                sock.disable_monitor()
                monitor.close(0)
                monitor = None
            name = _wire.clip(msg.name, 120)
            link = ClientLink(ctx, sock, f"{name}@{address}" if name else address, heartbeat_s, peer_timeout_s)
            ok = True
            return link, msg
    finally:
        if not ok:
            if monitor is not None:
                try:
                    sock.disable_monitor()
                except zmq.ZMQError:
                    pass
                monitor.close(0)
            sock.close(0)
            ctx.term()
