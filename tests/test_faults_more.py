"""More faults: a frozen peer (SIGSTOP), close/shutdown in every order, a restarted producer.

Detection times are written to ``out/faults.json`` (and printed with ``-s``).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import threading
import time
from typing import Any

import pytest
import torch

from tests import peers as P
from tests.conftest import SPAWN
from tests.peers import _report

PEER_TIMEOUT = 2.0
SLACK = 8.0  # a loaded 2-core machine: scheduling, not protocol, eats this
_FIGS = pathlib.Path(__file__).resolve().parent.parent / "out" / "faults.json"


def _record(name: str, value: Any) -> None:
    _FIGS.parent.mkdir(exist_ok=True)
    try:
        figs = json.loads(_FIGS.read_text())
    except (OSError, ValueError):
        figs = {}
    figs[name] = value
    _FIGS.write_text(json.dumps(figs, indent=1, sort_keys=True))
    print(f"\n{name}: {value}")


# -- a frozen or killed peer ----------------------------------------------------------------
@pytest.mark.parametrize("sig", ["SIGSTOP", "SIGKILL"])
@pytest.mark.parametrize("tls", ["tcp", "sm"])
def test_frozen_or_killed_receiver_sender_raises_within_peer_timeout(peers, tls, sig):
    recv = peers.start(P.streaming_receiver, tls, PEER_TIMEOUT)
    addr = peers.expect(recv, "addr", 60)
    peers.expect(recv, "ready", 10)
    send = peers.start(P.streaming_sender, tls, addr, PEER_TIMEOUT)
    peers.expect(send, "ready", 60)
    time.sleep(1.0)  # let a few 64 MiB tensors flow
    os.kill(recv.pid, getattr(signal, sig))
    t0 = time.monotonic()
    try:
        msg = peers.get(send, PEER_TIMEOUT + 30)
        elapsed = time.monotonic() - t0
    finally:
        if sig == "SIGSTOP":
            os.kill(recv.pid, signal.SIGCONT)  # thaw it, then clean up
            recv.kill()
            recv.join(10)
    _record(f"detect_{sig.lower()}_receiver_{tls}_s", round(elapsed, 2))
    assert msg[0] == "error", msg
    assert msg[1] in ("PeerDeadError", "PeerTimeoutError", "PeerClosedError"), msg
    assert "127.0.0.1" in msg[2] or "peer" in msg[2], msg  # names the peer
    if sig == "SIGSTOP":
        assert "silent" in msg[2] or "timed out" in msg[2], msg  # says why: frozen, not refused
    assert elapsed < PEER_TIMEOUT + SLACK, elapsed
    assert not send.is_alive() or send.join(10) is None


# -- close and shutdown never hang, in any order ------------------------------------------------
def _bounded(fn: Any, limit: float = 5.0) -> float:
    t0 = time.monotonic()
    fn()
    dt = time.monotonic() - t0
    assert dt < limit, f"{fn} took {dt:.1f}s"
    return dt


def test_close_listener_before_pipe_and_everything_twice():
    from transport import Pipe, PipeListener

    lst = PipeListener(timeout_s=10)
    client = Pipe.connect(lst.address, timeout_s=10, service="pipe")
    served = lst.accept(timeout=10)
    h = client.send_tensor_async(torch.arange(10))
    assert served.recv_tensor(timeout=10).tolist() == list(range(10))
    h.wait(10)
    _bounded(lst.close)
    _bounded(lst.close)
    # the accepted pipe outlives its listener's accept loop... and closes cleanly after it
    _bounded(served.close)
    _bounded(served.close)
    _bounded(client.close)
    _bounded(client.close)


def test_close_connector_first_then_listener_pipe():
    from transport import Pipe

    lst = Pipe.listen(timeout_s=10)
    c = Pipe.connect(lst.address, timeout_s=10)
    lst.wait_connected(10)
    _bounded(c.close)
    _bounded(lst.close)
    _bounded(c.close)
    _bounded(lst.close)


def test_close_unconnected_listener_and_never_used_pipe():
    from transport import Pipe, PipeListener

    _bounded(Pipe.listen().close)
    with PipeListener() as lst:
        pass
    _bounded(lst.close)


@pytest.mark.parametrize("side", ["listener", "connector"])
def test_close_while_recv_waits_in_another_thread_raises_promptly(side):
    from transport import Pipe, TransportError

    lst = Pipe.listen(timeout_s=60)
    c = Pipe.connect(lst.address, timeout_s=60)
    lst.wait_connected(10)
    waiter, other = (lst, c) if side == "listener" else (c, lst)
    box: dict[str, Any] = {}

    def recv() -> None:
        t0 = time.monotonic()
        try:
            box["got"] = waiter.recv_tensor(timeout=60)
        except BaseException as exc:  # noqa: BLE001
            box["exc"] = exc
        box["t"] = time.monotonic() - t0

    th = threading.Thread(target=recv, daemon=True)
    th.start()
    time.sleep(0.5)  # the receive is posted and waiting
    t0 = time.monotonic()
    _bounded(waiter.close)
    th.join(10)
    took = time.monotonic() - t0
    assert not th.is_alive(), "recv still blocked after close"
    assert isinstance(box.get("exc"), TransportError), box
    assert took < 3.0, took
    _record(f"recv_raises_after_close_{side}_s", round(took, 3))
    _bounded(other.close)
    _bounded(waiter.close)


def test_close_server_pipe_while_peer_recv_waits_peer_sees_closed():
    from transport import PeerError, Pipe

    lst = Pipe.listen(timeout_s=60, peer_timeout_s=PEER_TIMEOUT, heartbeat_s=0.2)
    c = Pipe.connect(lst.address, timeout_s=60, peer_timeout_s=PEER_TIMEOUT, heartbeat_s=0.2)
    lst.wait_connected(10)
    box: dict[str, Any] = {}

    def recv() -> None:
        try:
            c.recv_tensor(timeout=60)
        except BaseException as exc:  # noqa: BLE001
            box["exc"] = exc

    th = threading.Thread(target=recv, daemon=True)
    th.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    lst.close()
    th.join(PEER_TIMEOUT + SLACK)
    assert not th.is_alive()
    assert isinstance(box.get("exc"), PeerError), box
    _record("peer_recv_raises_after_remote_close_s", round(time.monotonic() - t0, 3))
    c.close()


# -- a producer restarted on the same port ------------------------------------------------------
def restartable_producer(q: Any, port: int, rid: str) -> None:
    from kv_transfer import LookupBuffer

    def body() -> Any:
        buf = LookupBuffer(1 << 20, lease_s=120)
        server = buf.serve("127.0.0.1", port, peer_timeout_s=PEER_TIMEOUT, heartbeat_s=0.2)
        buf.insert(None, None, torch.full((1000,), float(len(rid))), None, None, request_id=rid)
        q.put(("addr", server.address))
        time.sleep(300)  # until SIGKILLed
        return "not killed"

    _report(q, body)


def restart_consumer(q: Any, address: str, killed: Any, restarted: Any) -> None:
    """One consumer process across a producer restart: fetch, see the failure, reconnect, fetch."""
    from kv_transfer import LookupClient, PeerUnavailableError

    def body() -> Any:
        out: dict[str, Any] = {}
        c1 = LookupClient(address, timeout_s=10, peer_timeout_s=PEER_TIMEOUT, heartbeat_s=0.2)
        m = c1.fetch(request_id="first", wait_s=5)
        out["first"] = None if m is None else float(m.key[0])
        q.put(("fetched", out["first"]))
        killed.wait(60)
        t0 = time.monotonic()
        try:
            c1.fetch(request_id="nothing", wait_s=0.0, timeout=PEER_TIMEOUT + 10)
            out["after_kill"] = "answered?"
        except PeerUnavailableError as exc:
            out["after_kill"] = str(exc)[:200]
        out["after_kill_s"] = time.monotonic() - t0
        c1.close()
        c1.close()
        restarted.wait(120)
        end = time.monotonic() + 30
        while True:  # a new client to the restarted producer (same address), same process
            try:
                c2 = LookupClient(address, timeout_s=10, peer_timeout_s=PEER_TIMEOUT, heartbeat_s=0.2)
                break
            except PeerUnavailableError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.2)
        with c2:
            m = c2.fetch(request_id="second", wait_s=5)
            out["second"] = None if m is None else float(m.key[0])
        return out

    _report(q, body)


def test_restarted_producer_on_same_port_is_usable_without_restarting_consumer(peers):
    prod1 = peers.start(restartable_producer, 0, "first")
    addr = peers.expect(prod1, "addr", 60)
    port = int(addr.rsplit(":", 1)[1])
    killed, restarted = SPAWN.Event(), SPAWN.Event()
    cons = peers.start(restart_consumer, addr, killed, restarted)
    assert peers.expect(cons, "fetched", 60) == float(len("first"))
    os.kill(prod1.pid, signal.SIGKILL)
    prod1.join(10)
    killed.set()
    prod2 = peers.start(restartable_producer, port, "second")
    assert peers.expect(prod2, "addr", 60) == addr
    restarted.set()
    out = peers.expect(cons, "ok", 120)
    _record("restart_old_client_error_s", round(out["after_kill_s"], 2))
    assert "lookup server" in out["after_kill"], out
    assert out["after_kill_s"] < PEER_TIMEOUT + SLACK, out
    assert out["second"] == float(len("second")), out
    prod2.kill()
