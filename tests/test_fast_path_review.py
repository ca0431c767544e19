"""Review of the compiled one-message path (transport._ucp_tag): cases where it departs from the
ordinary path's promises. Each case runs with the fast path on and off (the control), over real
UCX in spawned processes: the in-process cases share one (CASES), the others have their own.

Each case failed with the fast path on when it was written (the review's findings); all are fixed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import select
import signal
import time
from typing import Any, Iterator

import pytest

from tests.conftest import Peers

@contextlib.contextmanager
def _pair(timeout_s: float = 30) -> Iterator[tuple[Any, Any]]:
    """A connected pipe pair in this process (real UCX), closed on the way out."""
    from transport import Pipe

    with Pipe.listen(timeout_s=timeout_s) as a, Pipe.connect(a.address, timeout_s=timeout_s) as b:
        a.wait_connected(timeout_s)
        yield a, b


def _report(q: Any, fast: str, fn: Any) -> None:
    os.environ["UCXKV_FAST_PATH"] = fast
    try:
        q.put(("ok", fn()))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the test
        q.put(("error", type(exc).__name__, str(exc), ""))
    q.close()
    q.join_thread()


def bad_device_case() -> dict:
    """A receive given an unusable ``device`` raises; the message it was for is still received next."""
    import torch

    with _pair() as (a, b):
        b.send_tensor(torch.tensor([7]))
        time.sleep(0.1)  # arrived (and maybe parked by a sweep) before the receive
        try:
            a.recv_tensor(device="no-such-device", timeout=2)
            first = "returned"
        except Exception as exc:  # noqa: BLE001 - reported below
            first = type(exc).__name__
        try:
            got = a.recv_tensor(timeout=2)
            second = f"value {int(got)}" if got is not None else "None"
        except Exception as exc:  # noqa: BLE001
            second = f"{type(exc).__name__}: {exc}"
        return {"first": first, "second": second}


def view_bits_case() -> dict:
    """A conjugate or negative view (torch's lazy bits over unchanged memory) arrives as its values,
    never as the memory under it."""
    import torch

    sent = {"conj": torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj(),
            "neg": torch._neg_view(torch.tensor([1.0, 2.0]))}
    out = {}
    with _pair() as (a, b):
        for name, t in sent.items():
            try:
                b.send_tensor(t, timeout=10)
            except Exception as exc:  # noqa: BLE001 - refusing is fine, corrupting is not
                out[name] = f"refused ({type(exc).__name__})"
                continue
            got = a.recv_tensor(timeout=10)
            out[name] = "values" if torch.equal(got, t.resolve_conj().resolve_neg()) else f"memory: {got.tolist()}"
    return out


def fork_case(sent: Any = None, out: Any = None) -> dict:
    """A forked child that receives on its parent's pipe gets LocalUsageError (the engine is the parent's).

    ``sent`` (default ``tensor([7])``) starts with 7; ``out``: receive into a tensor like it."""
    import torch

    from transport import LocalUsageError

    sent = torch.tensor([7]) if sent is None else sent
    with _pair() as (a, b):
        h = b.send_tensor_async(sent)
        time.sleep(0.1)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: one receive, its outcome down the os pipe, and out
            try:
                a.recv_tensor(timeout=2, out=None if out is None else torch.empty_like(out))
                out = "received"
            except LocalUsageError:
                out = "LocalUsageError"
            except BaseException as exc:  # noqa: BLE001
                out = type(exc).__name__
            os.write(w, out.encode())
            os._exit(0)
        os.close(w)
        ready, _, _ = select.select([r], [], [], 20)
        child = os.read(r, 100).decode() if ready else "hung (no answer in 20 s)"
        if not ready:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        parent = int(a.recv_tensor(timeout=5, out=out).view(-1)[0])  # the parent still has its message
        h.wait(5)
        return {"child": child, "parent": parent}


#: name -> what runs in the shared process, once with the fast path off and once on
CASES: dict[str, Any] = {
    "bad_device": bad_device_case,
    "view_bits": view_bits_case,
    "fork": fork_case,
    "oversized_9000": lambda: oversized_header_case(9000),
    "oversized_1M": lambda: oversized_header_case(1 << 20),
}


def both_modes(cases: dict[str, Any]) -> dict:
    """Runs every case of ``cases`` with the fast path off, then on (as tests/test_fast_path.py, by
    switching the engine's ``tag_fast``); returns ``{"name/mode": result}``."""
    from transport._engine import get_engine

    eng = get_engine()
    helper = eng.tag_fast
    assert helper is not None, "the fast-path helper could not be built"
    results = {}
    for mode in ("0", "1"):
        eng.tag_fast = helper if mode == "1" else None
        for name, case in cases.items():
            try:
                results[f"{name}/{mode}"] = case()
            except Exception as exc:  # noqa: BLE001 - one case's failure is its own
                results[f"{name}/{mode}"] = f"{type(exc).__name__}: {exc}"
    return results


def in_process_cases(q: Any) -> None:
    """Runs every case of CASES in both modes (:func:`both_modes`) and reports the results."""
    _report(q, "1", lambda: both_modes(CASES))


def shared_cases(target: Any) -> Iterator[dict]:
    """What ``target`` (run in one spawned process) reports; the process is cleaned up after."""
    ps = Peers()
    try:
        yield _run_with(ps, target)
    finally:
        ps.close()


@pytest.fixture(scope="module")
def cases() -> Iterator[dict]:
    yield from shared_cases(in_process_cases)


@pytest.mark.parametrize("fast", ["0", "1"])
def test_a_receive_with_a_bad_device_loses_no_message(cases: dict, fast: str):
    got = cases[f"bad_device/{fast}"]
    assert got["first"] != "returned"
    assert got["second"] == "value 7", got


@pytest.mark.parametrize("fast", ["0", "1"])
def test_a_conjugate_or_negative_view_is_never_sent_as_its_memory(cases: dict, fast: str):
    got = cases[f"view_bits/{fast}"]
    assert got == {"conj": "values", "neg": "values"}, got


@pytest.mark.parametrize("fast", ["0", "1"])
def test_a_forked_child_cannot_receive_on_its_parents_pipe(cases: dict, fast: str):
    got = cases[f"fork/{fast}"]
    assert got == {"child": "LocalUsageError", "parent": 7}, got


def dying_receiver(q: Any, fast: str) -> None:
    """Listens over tcp, reports its address, receives one tensor, then dies at once (SIGKILL)."""
    os.environ["UCX_TLS"] = "tcp"

    def body() -> None:
        from transport import Pipe

        p = Pipe.listen("127.0.0.1", 0, timeout_s=30)
        q.put(("addr", p.address))
        p.recv_tensor(timeout=30)
        os.kill(os.getpid(), signal.SIGKILL)

    _report(q, fast, body)


def surviving_sender(q: Any, fast: str, address: str) -> None:
    """Sends small tensors to a peer that dies until a send fails; reports the error and the peer's name."""
    os.environ["UCX_TLS"] = "tcp"
    import torch

    def body() -> dict:
        from transport import Pipe

        p = Pipe.connect(address, timeout_s=30, peer_timeout_s=2, heartbeat_s=0.2)
        try:
            end = time.monotonic() + 30
            i = 0
            while time.monotonic() < end:
                try:
                    p.send_tensor(torch.tensor([i]), timeout=5)
                except Exception as exc:  # noqa: BLE001 - what we came for
                    return {"error": f"{type(exc).__name__}: {exc}", "peer": p.peer, "sent": i}
                i += 1
                time.sleep(0.001)
            return {"error": None, "peer": p.peer, "sent": i}
        finally:
            p.close()

    _report(q, fast, body)


@pytest.mark.parametrize("fast", ["0", "1"])
def test_a_send_to_a_dead_peer_names_it(peers: Peers, fast: str):
    rx = peers.start(dying_receiver, fast)
    address = peers.expect(rx, "addr", timeout=60)
    got = _run_with(peers, surviving_sender, fast, address)
    assert got["error"] is not None, got
    assert got["peer"] in got["error"], got


def _run_with(peers: Peers, target: Any, *args: Any) -> dict:
    p = peers.start(target, *args)
    return peers.expect(p, "ok", timeout=90)


def no_compiler_body(q: Any, cache_dir: str, cc: str) -> None:
    """With an empty helper cache and a compiler that fails (or is missing), the engine comes up
    without the fast path and a pipe pair still carries small tensors."""
    os.environ["UCXKV_CACHE_DIR"], os.environ["CC"] = cache_dir, cc
    import torch

    def body() -> dict:
        from transport._engine import get_engine

        with _pair() as (a, b):
            b.send_tensor(torch.tensor([3]))
            got = int(a.recv_tensor(timeout=10))
        return {"fast": get_engine().tag_fast is not None, "got": got, "cached": sorted(os.listdir(cache_dir))}

    _report(q, "1", body)


def test_no_compiler_falls_back_to_the_python_path(peers: Peers, tmp_path: Any):
    got = _run_with(peers, no_compiler_body, str(tmp_path / "cache"), "/bin/false")
    assert got == {"fast": False, "got": 3, "cached": []}, got


def test_without_the_extension_the_compiled_path_is_off_whole(peers: Peers, tmp_path: Any):
    """A compiler that builds the helper but not the CPython extension (as where this Python has no
    headers): the engine comes up without the compiled path, not with half of it, and carries tensors."""
    cc = tmp_path / "cc"
    real = shutil.which("cc") or shutil.which("gcc")
    assert real is not None
    cc.write_text(f'#!/bin/sh\ncase "$*" in *ukv_tag_ext*) exit 1;; esac\nexec {real} "$@"\n')
    cc.chmod(0o755)
    got = _run_with(peers, no_compiler_body, str(tmp_path / "cache"), str(cc))
    assert got["fast"] is False and got["got"] == 3, got
    names = [n.rsplit("_", 1)[0] for n in got["cached"]]
    assert "ukv_tag" in names and "ukv_tag_ext" not in names, got  # the helper built, the extension not


def test_parallel_first_builds_share_one_cache(tmp_path: Any):
    """Three processes build the helpers into the same empty cache at once: each loads a whole library."""
    import subprocess
    import sys

    env = {**os.environ, "UCXKV_CACHE_DIR": str(tmp_path)}
    code = "from transport import _ucp_tag, _ucp_rma; assert _ucp_tag.lib() is not None; _ucp_rma.lib()"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    errors = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 3, errors
    # the two helpers and the extension, and no temporary left behind
    assert sorted(f.suffix for f in tmp_path.iterdir()) == [".so", ".so", ".so"]


def oversized_header_case(nbytes: int) -> dict:
    """A header frame of ``nbytes`` (past the 8 KiB frame) is a RemoteProtocolError naming the peer,
    the pipe breaks, and the process's engine still serves a new pair."""
    import numpy as np
    import torch

    from transport import PeerError, RemoteProtocolError

    with _pair() as (a, b):
        junk = np.full(nbytes, 7, dtype=np.uint8)
        req = b._engine.tag_send(b._ep, junk, b._tag(b._send_tag, 0, False))
        try:
            a.recv_tensor(timeout=10)
            first = "returned"
        except RemoteProtocolError as exc:
            first = "named" if a.peer in str(exc) else f"unnamed: {exc}"
        try:
            a.recv_tensor(timeout=1)
            second = "returned"
        except PeerError as exc:
            second = "broken" if "broken" in str(exc) else str(exc)
        deadline = time.monotonic() + 10
        while not req.completed and time.monotonic() < deadline:  # the sender's request is answered
            time.sleep(0.01)
        sender_done = req.completed
    with _pair() as (c, d):
        d.send_tensor(torch.tensor([9]))
        again = int(c.recv_tensor(timeout=10))
    return {"first": first, "second": second, "sender_done": sender_done, "again": again}


@pytest.mark.parametrize("size", ["9000", "1M"])
@pytest.mark.parametrize("fast", ["0", "1"])
def test_an_oversized_header_frame_breaks_the_pipe_only(cases: dict, fast: str, size: str):
    got = cases[f"oversized_{size}/{fast}"]
    assert got == {"first": "named", "second": "broken", "sender_done": True, "again": 9}, got


def test_cuda_payloads_stay_off_the_compiled_path_unless_asked(monkeypatch: pytest.MonkeyPatch):
    """``UCXKV_FAST_PATH_CUDA``: off unless ``1`` (the path has not run on a GPU yet), and a malformed
    value is refused by name rather than read as either."""
    from transport import LocalUsageError, _ucp_tag

    monkeypatch.delenv("UCXKV_FAST_PATH_CUDA", raising=False)
    assert _ucp_tag.cuda_enabled() is False
    for raw, want in (("0", False), ("1", True)):
        monkeypatch.setenv("UCXKV_FAST_PATH_CUDA", raw)
        assert _ucp_tag.cuda_enabled() is want
    monkeypatch.setenv("UCXKV_FAST_PATH_CUDA", "yes")
    with pytest.raises(LocalUsageError, match="UCXKV_FAST_PATH_CUDA='yes' must be 0 or 1"):
        _ucp_tag.cuda_enabled()
