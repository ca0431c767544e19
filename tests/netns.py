"""Separate "hosts" on one machine: Linux network namespaces joined by veth and a bridge.

Loopback hides the mistakes that bite on a cluster (binding to 127.0.0.1, advertising
the wrong address, shared memory between "nodes"). The :func:`netns` fixture builds
2 or 3 namespaces ``ukv<pid><letter>`` (hosts ``a``, ``b``, ``c``) plus a hub namespace
``ukv<pid>x`` holding a bridge; each host has ``lo`` up and one veth ``eth0`` with its own
address in a private /24 the fixture picks (``10.213.N.0/24``). The root namespace gets
no address and no route into that subnet, so no test traffic can go anywhere else.

    def test_x(netns):                  # 3 hosts; netns2 for 2
        a, b = netns.hosts[:2]
        netns.run(a, ["ip", "-br", "addr"])
        p = netns.popen(b, [sys.executable, "-m", "tests.netns", "pipe-send", ...])
        netns.link_down(a)              # partition: pull host a's cable at the switch
        netns.link_up(a)

Everything is torn down by a finalizer, even when the test fails, and namespaces left
behind by crashed runs (their pid is gone) are removed first. Root only: elsewhere the
fixture skips with the reason.

This module is also the body of the peer processes the tests start inside the
namespaces (``python -m tests.netns COMMAND ...``, JSON lines on stdout).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Iterator, Sequence

PREFIX = "ukv"
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)([a-z])$")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# =============================================================================
# The topology
# =============================================================================
def _ip(*args: str, timeout: float = 20, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout, check=check)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> list[str]:
    """Delete ``ukv<pid>?`` namespaces whose creating process is gone; returns their names."""
    try:
        out = _ip("netns", "list", check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    gone = []
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME_RE.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            _kill_ns_processes(name)
            _ip("netns", "del", name, check=False)
            gone.append(name)
    return gone


def _kill_ns_processes(name: str) -> None:
    try:
        pids = _ip("netns", "pids", name, check=False).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return
    for p in pids:
        try:
            os.kill(int(p), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


class NetNS:
    """2 or 3 namespaces (``hosts``) on one bridge; ``addr[host]`` is each one's IPv4 address."""

    def __init__(self, n_hosts: int = 3, subnet: int | None = None) -> None:
        if n_hosts not in (2, 3):
            raise ValueError("2 or 3 hosts")
        pid = os.getpid()
        self.subnet = subnet if subnet is not None else 20 + pid % 200
        self.prefix = f"10.213.{self.subnet}"
        self.hub = f"{PREFIX}{pid}x"
        self.hosts = [f"{PREFIX}{pid}{c}" for c in "abc"[:n_hosts]]
        self.addr = {h: f"{self.prefix}.{i + 1}" for i, h in enumerate(self.hosts)}
        self._ports = {h: f"p{c}" for h, c in zip(self.hosts, "abc")}
        self._procs: list[subprocess.Popen] = []
        self._created: list[str] = []

    # -- build / tear down ---------------------------------------------------
    def create(self) -> "NetNS":
        try:
            for ns in [self.hub, *self.hosts]:
                if ns in _ip("netns", "list").stdout.split():
                    _ip("netns", "del", ns, check=False)
                _ip("netns", "add", ns)
                self._created.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            for h in self.hosts:
                port = self._ports[h]
                # created inside the hub; the far end goes straight into the host namespace
                _ip("-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", h)
                _ip("-n", self.hub, "link", "set", port, "master", "br0")
                _ip("-n", self.hub, "link", "set", port, "up")
                _ip("-n", h, "addr", "add", f"{self.addr[h]}/24", "dev", "eth0")
                _ip("-n", h, "link", "set", "eth0", "up")
            self._wait_carrier()
        except BaseException:
            self.close()
            raise
        return self

    def _wait_carrier(self, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        for h in self.hosts:
            while "LOWER_UP" not in _ip("-n", h, "link", "show", "eth0").stdout:
                if time.monotonic() > end:
                    raise RuntimeError(f"eth0 in {h} has no carrier after {timeout}s")
                time.sleep(0.1)

    def close(self) -> None:
        for p in self._procs:
            kill_group(p)
        for ns in reversed(self._created):
            _kill_ns_processes(ns)
            _ip("netns", "del", ns, check=False)
        self._created.clear()

    # -- running things inside ------------------------------------------------
    def cmd(self, host: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", host, *argv]

    def run(self, host: str, argv: Sequence[str], *, timeout: float = 60, env: dict | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(host, argv), capture_output=True, text=True, timeout=timeout,
                              env=env, check=check, cwd=REPO_ROOT)

    def popen(self, host: str, argv: Sequence[str], *, env: dict | None = None, **kw: Any) -> subprocess.Popen:
        """Start ``argv`` in ``host`` in its own process group (killed at teardown)."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        kw.setdefault("cwd", REPO_ROOT)
        p = subprocess.Popen(self.cmd(host, argv), env=env, start_new_session=True, **kw)
        self._procs.append(p)
        return p

    def python(self, host: str, *args: str, env: dict | None = None, **kw: Any) -> subprocess.Popen:
        """``python -m tests.netns ARGS`` (a peer below) in ``host``, JSON lines on stdout."""
        kw.setdefault("stdin", subprocess.PIPE)
        return self.popen(host, [sys.executable, "-u", "-m", "tests.netns", *args], env=env, **kw)

    # -- partitions -------------------------------------------------------------
    def link_down(self, host: str) -> None:
        """Cut ``host`` off: its switch port goes down (its own address stays configured)."""
        _ip("-n", self.hub, "link", "set", self._ports[host], "down")

    def link_up(self, host: str) -> None:
        _ip("-n", self.hub, "link", "set", self._ports[host], "up")
        self._wait_carrier()


def kill_group(p: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM then SIGKILL ``p``'s process group; reap it."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(p.pid, signal.SIGKILL)  # children (vLLM engine core, workers) too
    except ProcessLookupError:
        pass
    try:
        p.wait(5)
    except subprocess.TimeoutExpired:
        pass


def skip_reason() -> str | None:
    """Why namespaces cannot be built here, or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (run the suite as root to test multi-node)"
    if shutil.which("ip") is None:
        return "the `ip` command is missing (apt-get install -y iproute2)"
    return None


def make(n_hosts: int) -> Iterator[NetNS]:
    """Fixture body: skip with the reason, or build, yield, and always tear down."""
    import pytest

    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    cleanup_stale()
    ns = NetNS(n_hosts)
    try:
        ns.create()
    except (subprocess.CalledProcessError, RuntimeError, OSError) as exc:
        err = getattr(exc, "stderr", "") or ""
        pytest.skip(f"cannot create network namespaces here: {exc} {err.strip()}")
    try:
        yield ns
    finally:
        ns.close()


def _lines(p: subprocess.Popen) -> "queue.Queue[str | None]":
    """A queue fed by a thread reading ``p``'s stdout (None at EOF); select() on a buffered pipe loses lines."""
    import queue
    import threading

    q = getattr(p, "_ukv_lines", None)
    if q is None:
        q = queue.Queue()

        def pump() -> None:
            for line in p.stdout:
                q.put(line)
            q.put(None)

        threading.Thread(target=pump, daemon=True).start()
        p._ukv_lines = q  # type: ignore[attr-defined]
    return q


def read_event(p: subprocess.Popen, timeout: float, want: str | None = None) -> dict:
    """The next JSON event (``want``: of that kind) from a peer's stdout within ``timeout`` s."""
    import queue

    q = _lines(p)
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        try:
            if left <= 0:
                raise queue.Empty
            line = q.get(timeout=left)
        except queue.Empty:
            raise AssertionError(f"peer {' '.join(map(str, p.args[3:7]))} sent no {want or 'event'} within "
                                 f"{timeout}s (exit {p.poll()})") from None
        if line is None:
            q.put(None)
            try:
                rc = p.wait(10)
            except subprocess.TimeoutExpired:
                rc = None
            err = p.stderr.read() if p.stderr and rc is not None else ""
            raise AssertionError(f"peer {' '.join(map(str, p.args[3:7]))} exited ({rc}) before "
                                 f"{want or 'an event'}:\n{err[-3000:]}")
        line = line.strip()
        if not line.startswith("{"):
            continue
        ev = json.loads(line)
        if ev.get("event") == "fatal":
            raise AssertionError(f"peer failed: {ev}")
        if want is None or ev.get("event") == want:
            return ev


# =============================================================================
# Peer process bodies (run inside a namespace)
# =============================================================================
def _emit(event: str, **kw: Any) -> None:
    print(json.dumps({"event": event, **kw}), flush=True)


def tensor_for(seed: int, nbytes: int) -> Any:
    """A deterministic tensor: bytes from ``seed`` viewed as a mix of dtypes by seed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    dtype = [torch.uint8, torch.float32, torch.bfloat16, torch.int64][seed % 4]
    return raw.view(dtype) if nbytes % dtype.itemsize == 0 else raw


def _same(a: Any, b: Any) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8).flatten(),
                                                                      b.contiguous().view(torch.uint8).flatten())


def _sizes(spec: str, rnd: int = 0) -> list[int]:
    """Tensor sizes of round ``rnd``: rounds are ``;``-separated, the last one repeats."""
    rounds = spec.split(";")
    return [int(float(s)) for s in rounds[min(rnd, len(rounds) - 1)].split(",") if s]


def peer_pipe_recv(host: str, sizes: str, peer_timeout: float, rounds: int) -> None:
    """Listen on ``host``; per round: accept one sender, receive tensors, check them bit for bit.

    ``sizes``: comma-separated byte counts, rounds separated by ``;`` (see :func:`_sizes`).
    Reports listening / got / done / error events.
    """
    from transport import Pipe, TransportError

    for rnd in range(rounds):
        pipe = Pipe.listen(host, 0, timeout_s=60, peer_timeout_s=peer_timeout, heartbeat_s=min(0.5, peer_timeout / 4))
        _emit("listening", address=pipe.address, round=rnd)
        n = 0
        t_wait = time.monotonic()
        try:
            pipe.wait_connected(60)
            for i, size in enumerate(_sizes(sizes, rnd)):
                t_wait = time.monotonic()
                t = pipe.recv_tensor(timeout=60)
                ok = _same(t, tensor_for(rnd * 1000 + i, size))
                n += 1
                _emit("got", round=rnd, i=i, nbytes=t.numel() * t.element_size(), exact=ok)
                if not ok:
                    break
            pipe.send_tensor(tensor_for(rnd * 1000 + 999, 4096), timeout=30)  # the other direction too
            _emit("done", round=rnd, n=n)
        except TransportError as exc:
            _emit("error", round=rnd, n=n, type=type(exc).__name__, message=str(exc),
                  waited_s=round(time.monotonic() - t_wait, 2))
        finally:
            pipe.close()


def peer_pipe_send(sizes: str, peer_timeout: float) -> None:
    """For each address read from stdin (one per line): connect, send the round's tensors, read the reply."""
    from transport import Pipe, TransportError

    for rnd, line in enumerate(sys.stdin):
        address = line.strip()
        if not address:
            break
        try:
            t0 = time.monotonic()
            pipe = Pipe.connect(address, timeout_s=10, peer_timeout_s=peer_timeout,
                                heartbeat_s=min(0.5, peer_timeout / 4))
        except TransportError as exc:
            _emit("error", round=rnd, type=type(exc).__name__, message=str(exc),
                  waited_s=round(time.monotonic() - t0, 2))
            continue
        sent = 0
        t_wait = time.monotonic()
        try:
            for i, size in enumerate(_sizes(sizes, rnd)):
                t_wait = time.monotonic()
                pipe.send_tensor(tensor_for(rnd * 1000 + i, size), timeout=60)
                sent += 1
                _emit("sent", round=rnd, i=i)
            back = pipe.recv_tensor(timeout=60)
            _emit("done", round=rnd, sent=sent, reply_exact=_same(back, tensor_for(rnd * 1000 + 999, 4096)),
                  peer=pipe.peer)
        except TransportError as exc:
            _emit("error", round=rnd, sent=sent, type=type(exc).__name__, message=str(exc),
                  waited_s=round(time.monotonic() - t_wait, 2))
        finally:
            pipe.close()


def peer_lookup_serve(host: str, lease_s: float) -> None:
    """A LookupBuffer served on ``host``; stdin commands: ``insert ID NBYTES``, ``stats``, ``quit``."""
    import torch

    from kv_transfer import LookupBuffer

    buf = LookupBuffer(1 << 30, lease_s=lease_s)
    srv = buf.serve(host, 0, peer_timeout_s=3.0)
    _emit("listening", address=srv.address)
    for line in sys.stdin:
        parts = line.split()
        if not parts or parts[0] == "quit":
            break
        if parts[0] == "insert":
            rid, nbytes = parts[1], int(parts[2])
            toks = torch.arange(16, dtype=torch.long) + sum(map(ord, rid))
            buf.insert(toks, torch.ones(16, dtype=torch.bool), tensor_for(len(rid), nbytes), None, None,
                       request_id=rid, timeout=10)
            _emit("inserted", id=rid)
        elif parts[0] == "stats":
            _emit("stats", expired=buf.expired, **buf.stats())
    srv.close()
    buf.close()


def peer_lookup_fetch(timeout_s: float) -> None:
    """stdin: ``connect ADDRESS`` then ``fetch ID NBYTES`` lines; reports each result or error."""
    from kv_transfer import LookupBuffer
    from kv_transfer.errors import KVTransferError

    client = None
    for line in sys.stdin:
        parts = line.split()
        if not parts or parts[0] == "quit":
            break
        t0 = time.monotonic()
        try:
            if parts[0] == "connect":
                if client is not None:
                    client.close()
                client = LookupBuffer.connect(parts[1], timeout_s=timeout_s, peer_timeout_s=3.0)
                _emit("connected", address=parts[1])
            elif parts[0] == "fetch":
                m = client.fetch(request_id=parts[1])
                exact = m is not None and _same(m.key, tensor_for(len(parts[1]), int(parts[2])))
                _emit("fetched", id=parts[1], found=m is not None, exact=exact)
        except KVTransferError as exc:
            _emit("error", type=type(exc).__name__, message=str(exc), waited_s=round(time.monotonic() - t0, 2))
    if client is not None:
        client.close()


def peer_http(url: str, body: str | None, timeout: float) -> None:
    """One HTTP request from inside a namespace; prints {"event": "http", "status", "body"}."""
    import urllib.error
    import urllib.request

    data = body.encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never leave the namespaces
    try:
        with opener.open(req, timeout=timeout) as r:
            _emit("http", status=r.status, body=r.read().decode())
    except urllib.error.HTTPError as exc:
        _emit("http", status=exc.code, body=exc.read().decode())
    except (urllib.error.URLError, OSError) as exc:
        _emit("http", status=0, body=str(exc))


def main(argv: Sequence[str]) -> int:
    import faulthandler

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID`: stacks on stderr, for a hung peer
    cmd, args = argv[0], list(argv[1:])
    try:
        if cmd == "pipe-recv":
            peer_pipe_recv(args[0], args[1], float(args[2]), int(args[3]))
        elif cmd == "pipe-send":
            peer_pipe_send(args[0], float(args[1]))
        elif cmd == "lookup-serve":
            peer_lookup_serve(args[0], float(args[1]))
        elif cmd == "lookup-fetch":
            peer_lookup_fetch(float(args[0]))
        elif cmd == "http":
            peer_http(args[0], args[1] if len(args) > 1 and args[1] != "-" else None,
                      float(args[2]) if len(args) > 2 else 30)
        else:
            raise SystemExit(f"unknown peer command {cmd}")
    except Exception as exc:  # noqa: BLE001
        import traceback

        _emit("fatal", type=type(exc).__name__, message=str(exc), tb=traceback.format_exc())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
