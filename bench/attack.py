"""Attack run (issue 15): every hostile-input class against real listeners, with RSS and fd baselines.

``python -m bench.attack [--consumers N] [--json FILE]`` starts, each in its own
process, a :class:`~transport.PipeListener` that echoes tensors (authentication
off, on loopback), the same with a shared secret, a ``LookupBuffer.serve`` and
an ``ucxkv-proxy`` (upstreams that refuse connections: every request it
forwards fails, as JSON). It then plays a hostile peer against them with raw
TCP, raw ZeroMQ and crafted frames, one class after another (the numbering is
issue 15's). After every attack it waits for the target's RSS and open file
descriptors to come back to their baseline (at most ``--settle`` seconds;
``RSS_SLACK_MIB`` and ``FD_SLACK`` of slack), checks that it still serves a
well-behaved client, and records before/after. It exits 1 if any check failed.

The attacks are the run's own inputs, written from the issue's descriptions,
not copies of ``tests/test_hostile_bounds.py``. Class 3 (an unterminated
multipart message) runs against the authenticated listener only: with
authentication off nothing bounds it (``docs/reliability.md``, threat model).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)

#: The secret of the run's own authenticated target (never a deployment's).
SECRET = "ucxkv-attack-run-secret-0123456789"
RSS_SLACK_MIB = 64
FD_SLACK = 3
_SPAWN = mp.get_context("spawn")


# -- measuring a process ------------------------------------------------------------------
def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` in MiB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def open_fds(pid: int) -> int:
    """How many file descriptors ``pid`` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- raw ZMTP 3.0: a peer that is not a ZeroMQ library ---------------------------------------
_GREETING = b"\xff" + b"\x00" * 7 + b"\x01\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32
_READY = b"\x05READY\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"


def zmtp_unterminated_parts(host: str, port: int, limit_bytes: int, part_bytes: int = 60_000,
                            timeout_s: float = 10.0) -> int:
    """Speak ZMTP 3.0 (NULL mechanism, as a DEALER) to ``host:port`` and send message parts that all
    say "more follows", never a last one, until ``limit_bytes`` went out or the listener dropped
    the connection. Returns the bytes sent. libzmq buffers such parts where the application cannot
    see them, and its ``MAXMSGSIZE`` bounds one part, not the message."""
    part = b"\x03" + struct.pack(">Q", part_bytes) + bytes(part_bytes)  # MORE | LONG frame
    sent = 0
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.sendall(_GREETING)
            got = b""
            while len(got) < len(_GREETING):
                chunk = s.recv(len(_GREETING) - len(got))
                if not chunk:
                    return sent
                got += chunk
            s.sendall(b"\x04" + bytes([len(_READY)]) + _READY)
            while sent < limit_bytes:
                s.sendall(part)
                sent += len(part)
    except OSError:  # reset, broken pipe or a listener that stopped reading: it refused us
        pass
    return sent


# -- the targets, each in its own process ---------------------------------------------------
def echo_listener(q: Any, secret: str | None = None) -> None:
    """A PipeListener on loopback that echoes every tensor back on every pipe, until killed.

    The body of a spawned process (an abort in it takes nothing else down; tests use it too):
    puts ``("addr", address)`` on ``q`` once it listens. Authentication is off, or ``secret``'s."""
    logging.basicConfig(level=logging.ERROR)
    from transport import PipeListener
    from transport.auth import Auth

    lst = PipeListener("127.0.0.1", 0, timeout_s=30, auth=Auth.secret(secret) if secret else Auth.none())
    q.put(("addr", lst.address))

    def echo(p: Any) -> None:
        try:
            while True:
                t = p.recv_tensor(timeout=60)
                p.send_tensor(t)
                if t is None:
                    break
        except Exception:  # noqa: BLE001 - a hostile peer breaks its own pipe; the listener goes on
            pass
        finally:
            p.close()

    while True:
        threading.Thread(target=echo, args=(lst.accept(timeout=None),), daemon=True).start()


def _lookup_target(q: Any) -> None:
    """A LookupBuffer served on loopback, until killed."""
    logging.basicConfig(level=logging.ERROR)
    from kv_transfer import LookupBuffer

    buf = LookupBuffer(64 << 20, lease_s=60)
    server = buf.serve("127.0.0.1", 0)
    q.put(("addr", server.address))
    while True:
        time.sleep(3600)


@dataclass
class Target:
    """A process under attack: where it listens and how a well-behaved client checks it serves."""

    name: str
    pid: int
    address: str
    serves: Callable[[], None]
    stop: Callable[[], None]
    auth: Any = None
    #: extra warm-up before the baseline is taken (e.g. what starts a worker pool)
    warm: Callable[[], None] | None = None
    rss0: float = 0.0
    fds0: int = 0

    def alive(self) -> bool:
        return os.path.exists(f"/proc/{self.pid}") and open(f"/proc/{self.pid}/stat").read().split()[2] != "Z"


def _spawned(name: str, fn: Callable[..., None], *args: Any) -> tuple[Any, str]:
    q = _SPAWN.Queue()
    p = _SPAWN.Process(target=fn, args=(q, *args), daemon=True, name=f"attack-{name}")
    p.start()
    try:
        _, address = q.get(timeout=120)
        return p, address
    except Exception:
        p.kill()
        raise RuntimeError(f"target {name} did not start within 120 s (exit code {p.exitcode})") from None


def echo_roundtrip(address: str, auth: Any, nbytes: int = 1 << 20) -> None:
    """One short-lived consumer: connect, send ``nbytes``, get them back, say goodbye."""
    import torch

    from transport import Pipe

    x = torch.full((nbytes // 4,), 7.0)
    with Pipe.connect(address, timeout_s=30, auth=auth) as c:
        c.send_tensor(x)
        back = c.recv_tensor(timeout=30)
        if not torch.equal(back, x):
            raise AssertionError(f"{address} echoed different bytes")
        c.send_tensor(None)
        c.recv_tensor(timeout=30)


def start_echo(secret: str | None) -> Target:
    from transport.auth import Auth

    p, address = _spawned("echo", echo_listener, secret)
    auth = Auth.secret(secret) if secret else Auth.none()
    return Target("pipe-listener" + ("-secret" if secret else ""), p.pid, address,
                  lambda: echo_roundtrip(address, auth), p.kill, auth)


def lookup_stats(address: str) -> None:
    from kv_transfer import LookupClient
    from transport.auth import Auth

    client = LookupClient(address, timeout_s=30, auth=Auth.none())
    try:
        client.stats()
    finally:
        client.close()


def start_lookup() -> Target:
    p, address = _spawned("lookup", _lookup_target)
    return Target("lookup-server", p.pid, address, lambda: lookup_stats(address), p.kill)


def _http(method: str, url: str, body: bytes | None = None, timeout: float = 30) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _big_body() -> bytes:
    return json.dumps({"prompt": list(range(2_500_000)), "max_tokens": 3}).encode()  # ~20 MiB


def start_proxy() -> Target:
    """ucxkv-proxy in front of upstreams that refuse connections (port 9 on loopback)."""
    dead = "http://127.0.0.1:9"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_REPO, os.environ.get("PYTHONPATH")])))
    p = subprocess.Popen([sys.executable, "-m", "kv_transfer.proxy", "--host", "127.0.0.1", "--port", "0",
                          "--prefill", dead, "--decode", dead, "--log-level", "WARNING"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=_REPO)
    line = p.stdout.readline()  # type: ignore[union-attr]
    m = re.search(r"listening on (http://\S+)", line)
    if not m:
        p.kill()
        raise RuntimeError(f"ucxkv-proxy did not start: {line!r}")
    url = m.group(1)

    def serves() -> None:
        status, _ = _http("GET", url + "/metrics", timeout=10)
        if status != 200:
            raise AssertionError(f"proxy /metrics answered {status}")

    def stop() -> None:
        # SIGTERM: the proxy shuts down its parse pool too (a SIGKILL left the pool's workers orphaned)
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            log.warning("ucxkv-proxy (pid %d) did not stop within 30 s of SIGTERM; killed", p.pid)
            p.kill()
            p.wait(10)

    def warm() -> None:
        # the first body over 256 KiB starts the proxy's parse pool, and the first 20 MiB one raises
        # its heap once (~80 MiB that the allocator keeps for the next; measured not to grow after)
        _http("POST", url + "/v1/completions", _big_body(), timeout=120)

    return Target("ucxkv-proxy", p.pid, url, serves, stop, warm=warm)


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- attacks: each returns what it did, raises AssertionError when the target misbehaved ---------
@dataclass
class Scale:
    """How hard each attack pushes (the CI tier uses small numbers, the full run the issue's)."""

    consumers: int = 1000
    flood_mib: int = 384
    parked: int = 40_000
    big_tensors: int = 4


def _ask(address: str, frames: list[bytes], timeout_ms: int = 10_000, auth: Any = None) -> Any:
    """Send ``frames`` from a fresh DEALER; the decoded answer, or None when none came. With a
    shared-secret ``auth`` the DEALER runs the CURVE keys it implies (past the ZeroMQ handshake)."""
    import zmq

    from transport import _wire

    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        if auth is not None and auth.mode == "secret":
            s.curve_publickey, s.curve_secretkey = auth.derived_curve("client")
            s.curve_serverkey = auth.derived_curve("server")[0]
        s.connect(f"tcp://{address}")
        s.send_multipart(frames)
        if not s.poll(timeout_ms):
            return None
        return _wire.decode(s.recv_multipart(), address)
    finally:
        ctx.destroy(linger=0)


def bad_worker_addresses(t: Target, s: Scale) -> str:
    """Class 1: Hellos whose worker address UCX cannot use must be Rejects, never an abort."""
    from transport import _wire

    cases = [b"", b"\x02", b"\xff" * 9, b"\x0f" + b"\x00" * 200, b"\x00" + bytes(range(256)) * 4,
             b"\x01" * 20_000]
    for wa in cases:
        ans = _ask(t.address, _wire.encode(_wire.Hello(role="pipe", name="attack", worker_address=wa, recv_tag=5)))
        if not isinstance(ans, _wire.Reject):
            raise AssertionError(f"Hello with worker address {wa[:12]!r} ({len(wa)} B) answered with {ans!r}")
    return f"{len(cases)} Hellos with unusable worker addresses, each answered with a Reject"


def malformed_control_messages(t: Target, s: Scale) -> str:
    """Class 2: deep nesting, wrong versions, bad framing and huge fields are Rejects; the control
    thread lives on (every case expects an answer from the same listener)."""
    from transport import _wire

    pre = struct.pack("<4sI", _wire.MAGIC, _wire.PROTOCOL_VERSION)
    hello = b"\x82\xa4type\xa5Hello\xa4role"  # {"type": "Hello", "role": ...}
    cases = {
        "60,000-deep nesting": [pre, hello + b"\x91" * 60_000 + b"\xc0"],
        "deep map nesting": [pre, hello + b"\x81\xa1k" * 20_000 + b"\xc0"],
        "60 KB field": [pre, b"\x82\xa4type\xa5Hello\xa4role\xda\xea\x60" + b"r" * 60_000],
        "version 99": [struct.pack("<4sI", _wire.MAGIC, 99), b"\x80"],
        "bad magic": [b"HTTP/1.1", b"\x80"],
        "one frame": [pre],
        "three frames": [pre, b"\x80", b"\x80"],
        "random body": [pre, bytes(range(256)) * 8],
        "unknown type": [pre, b"\x81\xa4type\xa4Evil"],
    }
    for what, frames in cases.items():
        ans = _ask(t.address, frames, auth=t.auth)
        if not isinstance(ans, _wire.Reject):
            raise AssertionError(f"{what}: answered with {ans!r}, expected a Reject")
        if len(ans.reason) > 400:
            raise AssertionError(f"{what}: the Reject echoes {len(ans.reason)} characters")
    # a frame over the size bound: libzmq drops that connection, nothing else
    if _ask(t.address, [pre, b"\x00" * (_wire.MAX_CONTROL_BODY + 4096)], timeout_ms=1000, auth=t.auth) is not None:
        raise AssertionError("an oversize frame was answered: it was read")
    return f"{len(cases)} malformed messages each got a short Reject; an oversize frame was dropped unread"


def unterminated_multipart(t: Target, s: Scale) -> str:
    """Class 3: raw ZMTP peers without credentials send endless "more follows" parts."""
    host, port = t.address.rsplit(":", 1)
    sent = [zmtp_unterminated_parts(host, int(port), s.flood_mib << 20) for _ in range(3)]
    return f"3 raw ZMTP peers got {sum(sent) >> 20} MiB of unterminated parts out (limit {3 * s.flood_mib} MiB)"


def no_credentials(t: Target, s: Scale) -> str:
    """Authentication: a Hello without the secret's CURVE keys gets no answer at all; a wrong
    secret or none at all is a PeerRejectedError at once."""
    from transport import PeerRejectedError, Pipe, _wire
    from transport.auth import Auth

    hello = _wire.encode(_wire.Hello(role="pipe", name="attack", worker_address=b"\x00" * 64, recv_tag=5))
    if (ans := _ask(t.address, hello, timeout_ms=2000)) is not None:
        raise AssertionError(f"a Hello without credentials was answered: {ans!r}")
    for wrong in (Auth.secret("not-the-attack-run-secret-0123456789"), Auth.none()):
        try:
            Pipe.connect(t.address, timeout_s=10, auth=wrong).close()
            raise AssertionError(f"a pipe with {wrong.mode} authentication was welcomed")
        except PeerRejectedError:
            pass
    return "a plain Hello got no answer; a wrong secret and no secret were refused"


class RawPeer:
    """A welcomed peer that writes on the data plane by hand (tags and headers of its choosing)."""

    def __init__(self, address: str, auth: Any = None) -> None:
        from transport import PipeOptions
        from transport._control import dial
        from transport._engine import get_engine
        from transport._wire import Hello
        from transport.auth import Auth

        self.eng = get_engine()
        self.link, welcome = dial(address, Hello(role="pipe", name="attack", worker_address=self.eng.address,
                                                 recv_tag=int.from_bytes(os.urandom(5), "little") | 1),
                                  options=PipeOptions(timeout_s=30, auth=auth or Auth.none()))
        self.ep = self.eng.connect(welcome.worker_address, address)
        self.base = welcome.recv_tag
        self._inflight: list[tuple[Any, Any]] = []

    def tag(self, seq: int, payload: bool, base: int | None = None) -> int:
        from transport.pipe import _SEQ_BITS

        return ((self.base if base is None else base) << (_SEQ_BITS + 1)) | (seq << 1) | int(payload)

    def send(self, tag: int, buf: Any) -> None:
        self._inflight.append((self.eng.tag_send(self.ep, buf, tag), buf))

    def header(self, seq: int, specs: list[Any], body: bytes | None = None) -> Any:
        """A header frame (the envelope's :class:`~transport._envelope.Header`) announcing ``specs``."""
        import numpy as np

        from transport import _envelope as codec

        frame = np.zeros(codec.HEADER_FRAME_SIZE, dtype=np.uint8)
        used = codec.encode_header(memoryview(frame), codec.Header(seq, specs, body))
        return frame[:used]

    def flush(self, timeout_s: float = 30) -> int:
        """Progress until every send finished (or failed: the target may drop us); how many failed."""
        deadline = time.monotonic() + timeout_s
        while self._inflight and time.monotonic() < deadline:
            with self.eng._lock:
                self.eng.worker.progress()
            self._inflight = [(r, b) for r, b in self._inflight if not r.completed]
        failed, self._inflight = len(self._inflight), []
        return failed

    def close(self) -> None:
        self.flush(5)
        self.link.close("attack over")
        self.eng.close_endpoint(self.ep)


def wrong_lengths(t: Target, s: Scale) -> str:
    """Class 5: payloads shorter or longer than their header said: the target's pipe refuses them
    (it says goodbye), it never hands out a tensor with a stale tail."""
    import numpy as np

    from transport._envelope import TensorSpec

    outcomes = []
    for what, got in (("short", 1000), ("long", (4 << 20) + 4096)):
        peer = RawPeer(t.address)
        try:
            peer.send(peer.tag(0, False), peer.header(0, [TensorSpec("float32", [1 << 20], 4 << 20, "cpu", False)]))
            peer.send(peer.tag(0, True), np.zeros(got, dtype=np.uint8))
            peer.flush()
            deadline = time.monotonic() + 30
            while peer.link.closed_reason is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if peer.link.closed_reason is None:
                raise AssertionError(f"{what} payload: the target neither echoed nor refused it within 30 s")
            outcomes.append(f"{what}: '{peer.link.closed_reason[:60]}'")
        finally:
            peer.close()
    return "a 4 MiB header with a " + ", ".join(outcomes)


def short_lived_consumers(t: Target, s: Scale) -> str:
    """Classes 6 and 7: many consumers that each move 1 MiB (rendezvous size) and go."""
    t0 = time.monotonic()
    for _ in range(s.consumers):
        t.serves()
    return f"{s.consumers} consumers in {time.monotonic() - t0:.1f} s"


def big_tensors(t: Target, s: Scale) -> str:
    """Class 7: 64 MiB tensors echoed and dropped: the target frees each with its last reference."""
    for _ in range(s.big_tensors):
        echo_roundtrip(t.address, t.auth, 64 << 20)
    return f"{s.big_tensors} x 64 MiB echoed"


def parked_messages(t: Target, s: Scale) -> str:
    """Class 8: a welcomed peer sends eager messages on tags nobody receives (far-ahead sequence
    numbers of its own pipe, tags no pipe has), leaves, and keeps sending on its old tags."""
    import numpy as np

    junk = np.full(4096, 0x5A, dtype=np.uint8)
    peer = RawPeer(t.address, t.auth)
    stranger = int.from_bytes(os.urandom(4), "little") << 1  # even: no pipe's base
    third = s.parked // 3
    try:
        for i in range(third):
            peer.send(peer.tag(1_000_000 + i, False), junk)
            peer.send(peer.tag(i, False, base=stranger), junk)
        failed = peer.flush()
        peer.link.close("leaving")  # the target closes its pipe...
        time.sleep(0.5)
        for i in range(third):  # ...and we keep sending on its tags
            peer.send(peer.tag(2_000_000 + i, True), junk)
        failed += peer.flush()
    finally:
        peer.eng.close_endpoint(peer.ep)
    sent_mib = 3 * third * junk.nbytes / 2**20
    return f"{3 * third} x 4 KiB ({sent_mib:.0f} MiB) parked, {failed} sends refused"


#: Its memory lands in UCX's receive pools, which keep their high-water mark (reused, never given
#: back to the OS): run 3 times, the target must not grow after the first, and that plateau becomes
#: the baseline of the attacks that follow.
parked_messages.pooled = True  # type: ignore[attr-defined]


def lookup_announcements(t: Target, s: Scale) -> str:
    """Class 4: lookup requests announcing tensors their type does not carry, and a huge query.

    The envelope's one header states how many tensors follow: a Stats with 2 gets an ErrorReply
    (they were received with it, the pipe stays in step); a Stats announcing as many tensors as a
    header frame holds gets an ErrorReply and the consumer is dropped without any being received."""
    import torch

    from kv_transfer import _lookup_wire as wire
    from transport import PeerError, Pipe
    from transport import _envelope as codec
    from transport.auth import Auth

    def answer(c: Any, what: str) -> Any:
        ans = wire.decode_response(c.recv_message(timeout=30)[0], t.address)
        if not isinstance(ans, wire.ErrorReply):
            raise AssertionError(f"{what} answered with {ans!r}")
        return ans

    with Pipe.connect(t.address, timeout_s=30, service="kvlookup", auth=Auth.none()) as c:
        c.send_message(wire.encode(wire.Stats(seq=1)), [torch.ones(4), torch.ones(4)])
        answer(c, "a Stats with 2 tensors")
        c.send_message(wire.encode(wire.Stats(seq=2)))
        if not isinstance(ans := wire.decode_response(c.recv_message(timeout=30)[0], t.address), wire.StatsReply):
            raise AssertionError(f"after an ErrorReply the pipe is out of step: a Stats answered with {ans!r}")
    body = wire.encode(wire.Stats(seq=3))
    # one msgpack nil per announced tensor; 16 bytes spare for the header's sequence number and array length
    many = codec.HEADER_FRAME_SIZE - 4 - len(codec._encoder.encode(codec.Header(0, [], body))) - 16
    with Pipe.connect(t.address, timeout_s=30, service="kvlookup", auth=Auth.none()) as c:
        c.send_message(body, [None] * many)
        answer(c, f"a Stats announcing {many} tensors")
        try:
            c.recv_message(timeout=30)
            raise AssertionError(f"a consumer announcing {many} tensors was not dropped")
        except PeerError:
            pass
    with Pipe.connect(t.address, timeout_s=30, service="kvlookup", auth=Auth.none()) as c:
        c.send_message_async(wire.encode(wire.Fetch(seq=4)),
                             [torch.zeros((wire.MAX_REQUEST_TENSOR_BYTES // 8) + 1, dtype=torch.int64), None])
        try:
            c.recv_message(timeout=30)
            raise AssertionError("a query tensor over the request bound was answered")
        except PeerError:
            pass
    return (f"a Stats with 2 tensors got an ErrorReply (pipe in step); one announcing {many:,} got an "
            "ErrorReply and its consumer dropped; a 64 MiB + 8 B query was refused unread")


def lookup_consumers(t: Target, s: Scale) -> str:
    n = max(1, s.consumers // 4)
    for _ in range(n):
        lookup_stats(t.address)
    return f"{n} lookup consumers (connect, stats, close)"


def post_raw_body(url: str, n: int) -> tuple[bytes, bytes]:
    """POST ``n`` bytes of body to ``url`` over a raw socket (the server may answer before reading
    them all); its status line and headers, and its body."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as c:
        c.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {n}\r\nConnection: close\r\n\r\n".encode())
        try:
            c.sendall(b" " * n)
        except OSError:
            pass
        answer = b""
        while chunk := c.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


def proxy_bodies(t: Target, s: Scale) -> str:
    """Class 9: an oversized body, clients closing mid-body, and a big body beside small requests."""
    host, port = t.address.removeprefix("http://").rsplit(":", 1)
    head, body = post_raw_body(t.address, 64 * 1024 * 1024 + 1)
    if not head.startswith(b"HTTP/1.1 413") or json.loads(body)["error"]["code"] != 413:
        raise AssertionError(f"oversized body: {head[:100]!r} {body[:200]!r}")
    for _ in range(20):
        with socket.create_connection((host, int(port)), timeout=10) as c:
            c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{\"prompt\": [1")
    worst = [0.0]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            t0 = time.monotonic()
            _http("GET", t.address + "/metrics", timeout=30)
            worst[0] = max(worst[0], time.monotonic() - t0)
            time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    big = _big_body()
    status, answer = _http("POST", t.address + "/v1/completions", big, timeout=120)
    done.set()
    poller.join(35)
    if status < 400 or "error" not in json.loads(answer):
        raise AssertionError(f"a {len(big) >> 20} MiB body to dead upstreams answered {status} {answer[:200]!r}")
    if worst[0] > 1.0:
        raise AssertionError(f"/metrics took {worst[0]:.2f} s while a {len(big) >> 20} MiB body was handled")
    return (f"64 MiB + 1 B body: JSON 413; 20 clients closed mid-body; a {len(big) >> 20} MiB body got a JSON "
            f"{status} while /metrics answered within {worst[0]:.2f} s")


# -- the run --------------------------------------------------------------------------------
@dataclass
class Result:
    target: str
    attack: str
    ok: bool
    detail: str
    rss_base_mib: float
    rss_after_mib: float
    fds_base: int
    fds_after: int
    seconds: float


@dataclass
class Report:
    scale: dict
    results: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results)


def _settle(t: Target, settle_s: float) -> tuple[float, int]:
    """Wait until the target's RSS and fds are back within slack of its baseline (or ``settle_s``)."""
    deadline = time.monotonic() + settle_s
    while True:
        rss, fds = rss_mib(t.pid), open_fds(t.pid)
        if (rss <= t.rss0 + RSS_SLACK_MIB and fds <= t.fds0 + FD_SLACK) or time.monotonic() >= deadline:
            return rss, fds
        time.sleep(0.2)


PLAN: dict[str, list[Callable[[Target, Scale], str]]] = {
    "pipe-listener": [bad_worker_addresses, malformed_control_messages, wrong_lengths, parked_messages,
                      big_tensors, short_lived_consumers],
    "pipe-listener-secret": [unterminated_multipart, no_credentials, malformed_control_messages,
                             short_lived_consumers],
    "lookup-server": [lookup_announcements, bad_worker_addresses, lookup_consumers],
    "ucxkv-proxy": [proxy_bodies],
}


def run(scale: Scale, settle_s: float = 20.0, only: set[str] | None = None) -> Report:
    """Start every target, attack it class by class, and record baselines, survival and service."""
    report = Report(scale=asdict(scale))
    starters = {"pipe-listener": lambda: start_echo(None), "pipe-listener-secret": lambda: start_echo(SECRET),
                "lookup-server": start_lookup, "ucxkv-proxy": start_proxy}
    for name, attacks in PLAN.items():
        if only and name not in only:
            continue
        t = starters[name]()
        try:
            for _ in range(3):  # warm up: lazy imports, first endpoints, allocator pools
                t.serves()
            if t.warm is not None:
                t.warm()
            time.sleep(0.5)
            t.rss0, t.fds0 = rss_mib(t.pid), open_fds(t.pid)
            log.info("%s (pid %d) at %s: baseline RSS %.0f MiB, %d fds", t.name, t.pid, t.address, t.rss0, t.fds0)
            for attack in attacks:
                t0 = time.monotonic()
                ok, detail = True, ""
                base = t.rss0
                try:
                    detail = attack(t, scale)
                    if getattr(attack, "pooled", False) and t.alive():
                        time.sleep(2)
                        plateau = rss_mib(t.pid)
                        for _ in range(2):
                            attack(t, scale)
                        time.sleep(2)
                        t.rss0 = max(t.rss0, plateau)
                        detail += (f"; x3: RSS {base:.0f} -> {plateau:.0f} MiB after the first (pool high-water), "
                                   f"{rss_mib(t.pid):.0f} MiB after the third")
                except Exception as exc:  # noqa: BLE001 - recorded as this attack's failure
                    ok, detail = False, f"{type(exc).__name__}: {exc}"
                if not t.alive():
                    ok, detail = False, f"target died; {detail}"
                    rss, fds = 0.0, 0
                else:
                    rss, fds = _settle(t, settle_s)
                    if rss > t.rss0 + RSS_SLACK_MIB or fds > t.fds0 + FD_SLACK:
                        ok = False
                        detail += f"; did not return to baseline within {settle_s:.0f} s"
                    try:
                        t.serves()
                    except Exception as exc:  # noqa: BLE001
                        ok, detail = False, f"{detail}; no longer serves: {type(exc).__name__}: {exc}"
                r = Result(t.name, attack.__name__, ok, detail, round(base, 1), round(rss, 1), t.fds0, fds,
                           round(time.monotonic() - t0, 1))
                report.results.append(r)
                log.log(logging.INFO if ok else logging.ERROR, "%s %s / %s: %s (RSS %.0f -> %.0f MiB, fds %d -> %d)",
                        "ok  " if ok else "FAIL", t.name, attack.__name__, detail, base, rss, t.fds0, fds)
                if not t.alive():
                    break
        finally:
            t.stop()
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.attack", description=__doc__.split("\n\n")[0])
    ap.add_argument("--consumers", type=int, default=1000, help="short-lived consumers per listener (default 1000)")
    ap.add_argument("--flood-mib", type=int, default=384, help="unterminated parts per raw peer, MiB (default 384)")
    ap.add_argument("--parked", type=int, default=40_000, help="4 KiB messages parked by class 8 (default 40000)")
    ap.add_argument("--big-tensors", type=int, default=4, help="64 MiB tensors echoed (default 4)")
    ap.add_argument("--settle", type=float, default=20.0, help="seconds to wait for the baseline (default 20)")
    ap.add_argument("--only", action="append", choices=sorted(PLAN), help="attack only this target (repeatable)")
    ap.add_argument("--json", help="write the results here as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("transport", "kv_transfer"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    report = run(Scale(args.consumers, args.flood_mib, args.parked, args.big_tensors), args.settle,
                 set(args.only) if args.only else None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ok": report.ok, "scale": report.scale, "results": [asdict(r) for r in report.results]}, f,
                      indent=1)
    width = max(len(f"{r.target} / {r.attack}") for r in report.results)
    for r in report.results:
        sys.stdout.write(f"{'ok  ' if r.ok else 'FAIL'} {f'{r.target} / {r.attack}':<{width}}  RSS {r.rss_base_mib:6.0f}"
                         f" -> {r.rss_after_mib:6.0f} MiB  fds {r.fds_base:3d} -> {r.fds_after:3d}  {r.seconds:5.1f} s\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
