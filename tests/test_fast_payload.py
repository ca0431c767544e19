"""Tensors with a payload through the compiled path (``ukv_send_tensor``, ``ukv_recv_tensors``) against
the ordinary Python path: the same wire both ways, the same errors, the same waits.

The interop and fault cases run sender and receiver in separate spawned processes, each with its own
``UCXKV_FAST_PATH``; the frame comparison runs one pipe pair in this process, switching the engine's
``tag_fast`` between sends.
"""

from __future__ import annotations

import os
import signal
import struct
import threading
import time
from typing import Any, Iterator

import pytest
import torch

from tests.conftest import Peers
from tests.test_fast_path_review import _pair, _report, _run_with, both_modes, shared_cases
from tests.test_fast_path_review import fork_case as review_fork_case
from transport import Pipe
from transport._engine import get_engine
from transport.errors import PeerError, PeerTimeoutError, RemoteProtocolError


def _payloads() -> list[torch.Tensor]:
    """Tensors whose bytes travel as a payload (64 KiB, 1 MiB, odd sizes, several dtypes)."""
    g = torch.Generator().manual_seed(5)
    return [torch.arange(16384, dtype=torch.float32),  # 64 KiB
            torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, generator=g),  # 1 MiB
            torch.randint(-999, 999, (3001, 7), dtype=torch.int16, generator=g),
            torch.randn(123, 457, generator=g).to(torch.bfloat16),
            torch.randn(1, 100003, dtype=torch.float64, generator=g),
            torch.randint(0, 2, (70001,), generator=g).bool(),
            torch.randint(-128, 127, (8193,), dtype=torch.int8, generator=g)]  # just past the inline room


def _mixed() -> list[torch.Tensor | None]:
    """A send_tensors of inline tensors, payload tensors and a None."""
    return [torch.arange(5), torch.full((40000,), 3, dtype=torch.int32), None, torch.ones(7600, dtype=torch.uint8),
            torch.arange(30000, dtype=torch.float64).view(100, 300)]


def _same(got: Any, want: Any) -> bool:
    if want is None:
        return got is None
    return got is not None and got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


def _count_states(pipe_mod: Any) -> dict:
    """Counts, by ``_ucp_tag.ST_*`` name, where each compiled receive slot was when handed over."""
    from transport import _ucp_tag

    names = {getattr(_ucp_tag, n): n for n in dir(_ucp_tag) if n.startswith("ST_")}
    counts: dict[str, int] = {}
    hand_over = pipe_mod.Pipe._hand_over

    def counting(self: Any, fb: Any, slots: Any) -> None:
        for c in fb.arr:
            counts[names[c.state]] = counts.get(names[c.state], 0) + 1
        hand_over(self, fb, slots)

    pipe_mod.Pipe._hand_over = counting
    return counts


def interop_receiver(q: Any, fast: str) -> None:
    """Listens, reports its address, receives what interop_sender sends in four ways, reports the checks."""

    def body() -> dict:
        from transport import pipe as pipe_mod

        counts = _count_states(pipe_mod)
        p = Pipe.listen(timeout_s=60)
        q.put(("addr", p.address))
        p.wait_connected(60)
        want, mixed, ok = _payloads(), _mixed(), {}
        try:
            outs = [torch.empty_like(t) for t in want]
            got = p.recv_tensors(out=outs, timeout=60)
            ok["batch"] = all(g is o and _same(g, t) for g, o, t in zip(got, outs, want))
            outs = [torch.empty_like(t) for t in want]
            ok["one_by_one_into"] = all(p.recv_tensor(out=o, timeout=60) is o and _same(o, t) for o, t in zip(outs, want))
            ok["fresh"] = all(_same(p.recv_tensor(timeout=60), t) for t in want)
            ok["mixed"] = all(_same(p.recv_tensor(timeout=60), t) for t in mixed)
            # a None where a payload was expected: that slot gives None, the others their tensors
            outs = [torch.empty(40000, dtype=torch.int32), torch.empty(1), torch.empty(30000, dtype=torch.float64)]
            got = p.recv_tensors(out=outs, timeout=60)
            ok["none_in_batch"] = _same(got[0], mixed[1]) and got[1] is None and _same(got[2], mixed[4].view(-1))
            p.send_tensor(None)  # done
            return {"ok": ok, "states": dict(counts), "received": p.bytes_received}
        finally:
            p.close()

    _report(q, fast, body)


def interop_sender(q: Any, fast: str, address: str) -> None:
    """Sends _payloads three times (async, send_tensors, one by one), _mixed, then [payload, None, payload]."""

    def body() -> dict:
        p = Pipe.connect(address, timeout_s=60)
        try:
            want, mixed = _payloads(), _mixed()
            for h in [p.send_tensor_async(t) for t in want]:
                h.wait(60)
            p.send_tensors(want, timeout=60)
            for t in want:
                p.send_tensor(t, timeout=60)
            p.send_tensors(mixed, timeout=60)
            p.send_tensors([mixed[1], None, mixed[4].view(-1)], timeout=60)
            p.recv_tensor(timeout=60)
            return {"sent": p.bytes_sent}
        finally:
            p.close()

    _report(q, fast, body)


@pytest.mark.parametrize("send_fast,recv_fast", [("1", "0"), ("0", "1"), ("1", "1")])
def test_payload_tensors_cross_between_fast_and_ordinary_peers(peers: Peers, send_fast: str, recv_fast: str):
    rx = peers.start(interop_receiver, recv_fast)
    address = peers.expect(rx, "addr", timeout=60)
    tx = peers.start(interop_sender, send_fast, address)
    got, sent = peers.expect(rx, "ok", timeout=120), peers.expect(tx, "ok", timeout=120)
    assert all(got["ok"].values()) and len(got["ok"]) == 5, got
    assert got["received"] == sent["sent"]
    states = got["states"]
    if recv_fast == "0":
        assert states == {}, states
    else:  # every header compared was the one expected (whichever path sent it), but the None's
        assert states.get("ST_HDR_OTHER", 0) <= 1 and "ST_PAY_OTHER" not in states, states


@pytest.fixture()
def pair() -> Iterator[tuple[Pipe, Pipe]]:
    if get_engine().tag_fast is None:
        pytest.skip("the fast-path helper could not be built here (no C compiler?)")
    with _pair() as ab:
        yield ab


def test_fast_payload_sends_put_the_ordinary_header_on_the_wire(pair: tuple[Pipe, Pipe],
                                                               monkeypatch: pytest.MonkeyPatch):
    """The header frame of each payload tensor, byte for byte: fast send, ordinary send, and the frame
    the fast receive expects (the sequence number aside)."""
    a, b = pair
    eng = get_engine()
    helper = eng.tag_fast
    frames: list[bytes] = []
    send_tensors, send_tensor, tag_send = eng.send_tensors, eng.send_tensor, eng.tag_send

    def record_fast(ep: Any, posts: list, *rest: Any) -> Any:
        frames.extend(struct.pack("<I", len(header)) + header for _, header, _, _, _ in posts)
        return send_tensors(ep, posts, *rest)

    def record_one(ep: Any, tag: int, header: bytes, *rest: Any) -> Any:  # a stream's send (_pay_memo's too)
        frames.append(struct.pack("<I", len(header)) + header)
        return send_tensor(ep, tag, header, *rest)

    def record_ordinary(ep: Any, buf: Any, t: int) -> Any:
        if not t & 1:  # headers only
            frames.append(bytes(buf))
        return tag_send(ep, buf, t)

    monkeypatch.setattr(eng, "send_tensors", record_fast)
    monkeypatch.setattr(eng, "send_tensor", record_one)
    monkeypatch.setattr(eng, "tag_send", record_ordinary)
    try:
        for t in _payloads():
            for fast in (True, True, False):  # the second from the memo of the first (Pipe._pay_memo)
                eng.tag_fast = helper if fast else None
                seq = b._send_seq
                n = len(frames)
                h = b.send_tensor_async(t)
                assert len(frames) == n + 1
                eng.tag_fast = helper
                expected = a._payload_header(torch.empty_like(t), seq)
                assert expected is not None and frames[-1] == expected[1], (t.dtype, t.shape, fast)
                got = a.recv_tensor(out=torch.empty_like(t), timeout=30)
                h.wait(30)
                assert torch.equal(got, t)
    finally:
        eng.tag_fast = helper
    # what rides inline is not a payload: the compiled receive leaves it to the inline path
    assert a._payload_header(torch.empty(7600, dtype=torch.uint8), 0) is None
    assert a._payload_header(torch.empty(40000, device="meta"), 0) is None


@pytest.mark.parametrize("seq", [0, 127, 128, 255, 256, 65535, 65536, (1 << 23) - 1, 1 << 23])
def test_the_compiled_header_is_the_ordinary_frame_at_every_seq_width(pair: tuple[Pipe, Pipe], seq: int):
    """The header the compiled send puts on the wire and the receive expects (one msgspec encoding of a
    cached spec) equals the frame the ordinary send writes for the same tensor, at every width msgpack
    gives the sequence number (1 to 5 bytes: the inline room changes with it) and past the mask; the
    same for a CUDA tensor of that dtype and shape."""
    from transport import _envelope as codec
    from transport.pipe import _SEQ_MASK, _u32_framed

    a, _ = pair
    near = [torch.empty(n, dtype=torch.uint8) for n in range(7648, 7664)]  # around the inline boundary
    kinds = set()
    for t in _payloads() + near:
        spec = codec.spec_of(t, False)
        header_len = codec.header_size(codec.Header(seq & _SEQ_MASK, [spec], None))
        frame = memoryview(bytearray(codec.HEADER_FRAME_SIZE))
        # a CUDA sender's header (UCXKV_FAST_PATH_CUDA): the same bytes from both paths
        cuda = codec.TensorSpec(spec.dtype, spec.shape, spec.nbytes, "cuda", False)
        body = a._payload_header_bytes(t.dtype, t.shape, t.nbytes, seq, "cuda")
        if codec.rides_inline(cuda.nbytes, codec.header_size(codec.Header(seq & _SEQ_MASK, [cuda], None))):
            assert body is None
        else:
            used = codec.encode_header(frame, codec.Header(seq & _SEQ_MASK, [cuda], None))
            assert body is not None and _u32_framed(body) == bytes(frame[:used]), (t.dtype, t.shape, seq)
        inline = codec.rides_inline(spec.nbytes, header_len)
        kinds.add(inline)
        if inline:  # the ordinary send inlines it: not a payload
            assert a._payload_header(t, seq) is None
            continue
        used = codec.encode_header(frame, codec.Header(seq & _SEQ_MASK, [spec], None))
        got = a._payload_header(t, seq)
        assert got is not None and got[1] == bytes(frame[:used]), (t.dtype, t.shape, seq)
    assert kinds == {True, False}  # both sides of the boundary were compared


@pytest.mark.parametrize("seq", [126, 254, 65534, (1 << 23) - 2])
def test_a_stream_of_one_shape_sends_the_ordinary_frame_across_seq_widths(pair: tuple[Pipe, Pipe], seq: int):
    """Sends of one dtype and shape after the first take their header from the pipe's memo
    (``Pipe._pay_memo``, the bytes after the sequence number): across each change of the number's
    msgpack width, and past the mask, the frames are the ones the receiver expects (the compiled
    receive into ``out`` builds them from its spec's bytes after seq and finds no other header),
    the ordinary decode reads them, and every tensor arrives bit-exact."""
    from transport import _ucp_tag

    a, b = pair
    a._recv_seq = b._send_seq = seq  # (both sides agree: as if ``seq`` tensors had gone before)
    g = torch.Generator().manual_seed(seq)
    sent = [torch.randint(-999, 999, (3001, 7), dtype=torch.int16, generator=g) for _ in range(8)]
    hs = [b.send_tensor_async(t) for t in sent]
    assert b._pay_memo is not None and b._pay_memo[:2] == (torch.int16, torch.Size([3001, 7]))
    states: list[int] = []
    hand_over = a._hand_over

    def recording(fb: Any, slots: Any) -> None:
        states.extend(c.state for c in fb.arr)
        hand_over(fb, slots)

    a._hand_over = recording  # type: ignore[method-assign]
    outs = [torch.empty(3001, 7, dtype=torch.int16) for _ in range(4)]
    try:
        got = a.recv_tensors(out=outs, timeout=30)
    finally:
        del a._hand_over
    # (a payload that stalls may hand its window over; a header the window did not expect never comes)
    assert len(states) == 4 and _ucp_tag.ST_HDR_OTHER not in states, states
    got += [a.recv_tensor(timeout=30) for _ in range(4)]
    for h in hs:
        h.wait(30)
    assert all(torch.equal(x, t) for x, t in zip(got, sent))


def test_the_send_memo_applies_only_to_what_it_describes(pair: tuple[Pipe, Pipe]):
    """After a stream's memo is set, a tensor of the same shape that is not what it describes (another
    dtype, strided, a lazy negative view, another shape of as many bytes) takes the full checks: each
    arrives with its own dtype, shape and values."""
    a, b = pair
    base = torch.arange(32768, dtype=torch.float32).view(128, 256)
    same_bytes = torch.arange(32768, dtype=torch.int32).view(128, 256)
    strided = torch.arange(65536, dtype=torch.float32).view(128, 512)[:, ::2]
    neg = torch._neg_view(base)
    flat = torch.arange(32768, dtype=torch.float32)
    for t in (same_bytes, strided, neg, flat, base + 1):
        hs = [b.send_tensor_async(base)]
        assert b._pay_memo is not None and b._pay_memo[:2] == (torch.float32, base.shape)
        hs.append(b.send_tensor_async(t))  # sent while the memo describes base
        assert torch.equal(a.recv_tensor(timeout=30), base)
        got = a.recv_tensor(timeout=30)
        for h in hs:
            h.wait(30)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t.resolve_neg()), t.dtype


def mismatch_case() -> dict:
    """What a receive into ``out`` makes of a send it does not match, then what the pipe does next."""
    from transport import PeerError

    results = {}
    for name, send, out in [
            ("dtype", torch.ones(64, 1024), torch.empty(64, 1024, dtype=torch.float16)),
            ("shape", torch.ones(64, 1024), torch.empty(1024, 64)),
            ("none", None, torch.empty(1 << 16)),
            ("inline", torch.ones(4), torch.empty(1 << 16)),
            ("bigger", torch.ones(1 << 17), torch.empty(1 << 16))]:
        out.fill_(-5)
        with _pair() as (a, b):
            h = b.send_tensor_async(send)
            try:
                got = a.recv_tensor(out=out, timeout=10)
                first = "None" if got is None else f"returned {got is out}"
            except Exception as exc:  # noqa: BLE001 - what we came for
                first = f"{type(exc).__name__}: {exc}".replace(a.peer, "PEER")
            try:
                h.wait(2)
                sent = "done"
            except Exception as exc:  # noqa: BLE001
                sent = type(exc).__name__
            b.send_tensor(torch.tensor([1]))
            try:
                then = f"value {int(a.recv_tensor(timeout=2))}"
            except PeerError as exc:
                then = "broken" if "broken" in str(exc) else type(exc).__name__
            results[name] = {"first": first, "then": then, "out_untouched": bool((out == -5).all())}
    return results


def timeout_case() -> dict:
    """A receive into ``out`` that times out, then the send arrives: what each following call gets
    (``out`` of a payload size, and of an inline size; a receive without ``out`` for comparison)."""
    results = {}
    for how, n in (("recv_tensor", 1 << 16), ("recv_tensor_inline", 4), ("batch", 1 << 16), ("no_out", 1 << 16)):
        with _pair() as (a, b):
            out = torch.empty(n)
            t0 = time.monotonic()
            try:
                if how == "batch":
                    a.recv_tensors(out=[out], timeout=0.3)
                elif how == "no_out":
                    a.recv_tensor(timeout=0.3)
                else:
                    a.recv_tensor(out=out, timeout=0.3)
                first, says = "returned", ""
            except Exception as exc:  # noqa: BLE001
                first, says = type(exc).__name__, str(exc)
            took = time.monotonic() - t0
            b.send_tensor_async(torch.full((n,), 2.0))
            try:
                then = f"sum {float(a.recv_tensor(timeout=5).sum())}"
            except Exception as exc:  # noqa: BLE001
                then = type(exc).__name__ + (" (broken)" if "broken" in str(exc) else "")
            results[how] = {"first": first, "in_time": 0.25 < took < 5, "then": then,
                            "says_unusable": "now unusable" in says and "land in out" in says}
    return results


def fork_case() -> dict:
    """A forked child that receives into ``out`` on its parent's pipe gets LocalUsageError."""
    return review_fork_case(torch.full((1 << 16,), 7.0), torch.empty(1 << 16))


def send_timeout_case() -> dict:
    """A send of a 1 MiB payload nobody receives, waited with a timeout: alone and as the first of a window."""
    results = {}
    for how in ("one", "window"):
        with _pair() as (a, b):
            hs = [b.send_tensor_async(torch.full((1 << 18,), float(i))) for i in range(1 if how == "one" else 4)]
            done_before = hs[0].done()
            t0 = time.monotonic()
            try:
                hs[0].wait(0.3)
                first, says = "returned", ""
            except Exception as exc:  # noqa: BLE001 - what we came for
                first, says = type(exc).__name__, str(exc)
            took = time.monotonic() - t0
            try:
                b.send_tensor(torch.ones(4), timeout=2)
                then = "sent"
            except Exception as exc:  # noqa: BLE001
                then = type(exc).__name__ + (" (broken)" if "broken" in str(exc) else "")
            results[how] = {"done_before": done_before, "first": first, "in_time": 0.25 < took < 5,
                            "names_peer": b.peer in says, "then": then}
    return results


def in_process_cases(q: Any) -> None:
    """mismatch_case, timeout_case, send_timeout_case and fork_case with the fast path off, then on."""
    _report(q, "1", lambda: both_modes({"mismatch": mismatch_case, "timeout": timeout_case,
                                        "send_timeout": send_timeout_case, "fork": fork_case}))


@pytest.fixture(scope="module")
def cases() -> Iterator[dict]:
    yield from shared_cases(in_process_cases)


def test_a_mismatch_into_out_raises_what_the_ordinary_path_raises(cases: dict):
    fast, ordinary = cases["mismatch/1"], cases["mismatch/0"]
    assert fast == ordinary, (fast, ordinary)
    assert "RemoteProtocolError" in fast["dtype"]["first"] and "PEER" in fast["dtype"]["first"], fast
    assert "RemoteProtocolError" in fast["shape"]["first"] and fast["shape"]["then"] == "broken", fast
    assert fast["none"]["first"] == "None" and fast["none"]["then"] == "value 1", fast
    assert all(r["out_untouched"] for r in fast.values()), fast


def test_a_timed_out_receive_into_out_behaves_as_the_ordinary_one(cases: dict):
    fast, ordinary = cases["timeout/1"], cases["timeout/0"]
    assert fast == ordinary, (fast, ordinary)
    assert all(r["first"] == "PeerTimeoutError" and r["in_time"] for r in fast.values()), fast


@pytest.mark.parametrize("fast", ["0", "1"])
def test_recv_tensor_into_out_that_times_out_breaks_the_pipe_and_says_why(cases: dict, fast: str):
    """Pipe.recv_tensor's promise: with out, a timeout breaks the pipe (the bytes could still land in out
    later), in an error that says so; without out, the receive stays posted and the next call gets it."""
    got = cases[f"timeout/{fast}"]
    for how in ("recv_tensor", "recv_tensor_inline"):
        assert got[how]["says_unusable"] and got[how]["then"] == "PeerError (broken)", got
    assert got["no_out"]["then"] == f"sum {2.0 * (1 << 16)}" and not got["no_out"]["says_unusable"], got


def test_a_send_nobody_receives_times_out_and_breaks_the_pipe_in_both_modes(cases: dict):
    """``send_tensor_async(...).wait(timeout)`` of a payload (the compiled path's handle, or the ordinary
    one) raises PeerTimeoutError naming the peer in time, alone or first of a window; the pipe is broken."""
    fast, ordinary = cases["send_timeout/1"], cases["send_timeout/0"]
    assert fast == ordinary, (fast, ordinary)
    for how in ("one", "window"):
        assert fast[how] == {"done_before": False, "first": "PeerTimeoutError", "in_time": True,
                             "names_peer": True, "then": "PeerError (broken)"}, fast


def test_a_forked_child_cannot_receive_a_payload_on_its_parents_pipe(cases: dict):
    assert cases["fork/1"] == cases["fork/0"] == {"child": "LocalUsageError", "parent": 7}, cases


def killed_sender(q: Any, fast: str, address: str, direction: str) -> None:
    """Connects, starts a 512 MiB transfer (sending it, or receiving it) and SIGKILLs itself mid-way."""
    os.environ["UCX_TLS"] = "tcp"

    def body() -> None:
        p = Pipe.connect(address, timeout_s=60, peer_timeout_s=2, heartbeat_s=0.2)
        big = torch.ones(1 << 29, dtype=torch.uint8)
        if direction == "send":
            p.send_tensor_async(big)
        else:  # "recv", "recv_window": the survivor sends
            p.recv_tensors_async(out=[big])
        # 512 MiB over loopback tcp takes ~0.25 s or more: dying 50 ms in never lets it finish first
        # (at 0.3 s a fast run did, and the survivor saw no error)
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)

    _report(q, fast, body)


def surviving_peer(q: Any, fast: str, direction: str) -> None:
    """Listens; receives (or sends) the 512 MiB tensor its killed peer was sending (receiving); reports
    the error and how long after the start of the wait it came."""
    os.environ["UCX_TLS"] = "tcp"

    def body() -> dict:
        p = Pipe.listen(timeout_s=60, peer_timeout_s=2, heartbeat_s=0.2)
        q.put(("addr", p.address))
        p.wait_connected(60)
        big = torch.empty(1 << 29, dtype=torch.uint8)
        t0 = time.monotonic()
        try:
            if direction == "send":  # the peer sends: we receive
                p.recv_tensors(out=[big], timeout=60)
            elif direction == "recv":
                p.send_tensor(big, timeout=60)
            else:  # a window of background sends (send_tensor_async), waited in order
                for h in [p.send_tensor_async(big) for _ in range(3)]:
                    h.wait(60)
            return {"error": None, "after": time.monotonic() - t0}
        except Exception as exc:  # noqa: BLE001 - what we came for
            return {"error": f"{type(exc).__name__}: {exc}", "after": time.monotonic() - t0, "peer": p.peer}
        finally:
            p.close()

    _report(q, fast, body)


@pytest.mark.parametrize("direction", ["send", "recv", "recv_window"])
@pytest.mark.parametrize("fast", ["0", "1"])
def test_a_peer_killed_mid_payload_is_a_peer_error_not_a_hang(peers: Peers, fast: str, direction: str):
    rx = peers.start(surviving_peer, fast, direction)
    address = peers.expect(rx, "addr", timeout=60)
    peers.start(killed_sender, fast, address, direction)
    got = peers.expect(rx, "ok", timeout=90)
    assert got["error"] is not None and got["error"].startswith(("PeerDeadError", "PeerError")), got
    assert got["peer"] in got["error"] and got["after"] < 15, got


def test_payload_requests_complete_through_native_waits(pair: tuple[Pipe, Pipe]):
    """A stream of payload sends and batched receives into ``out`` ends with nothing left in flight."""
    a, b = pair
    eng = get_engine()
    t = torch.arange(1 << 16, dtype=torch.float32)
    outs = [torch.empty_like(t) for _ in range(8)]
    for _ in range(20):
        hs = [b.send_tensor_async(t) for _ in range(8)]
        got = a.recv_tensors(out=outs, timeout=30)
        for h in hs:
            h.wait(30)
        assert all(g is o and torch.equal(o, t) for g, o in zip(got, outs))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with eng._lock:
            left = [r for r, _ in eng._draining if not r.completed] + [r for r in eng._sends.queue if not r.completed]
            tracked = eng._sends.tracked
        if not left and not tracked:
            break
        time.sleep(0.01)
    assert not left and not tracked


def test_send_tensor_async_of_a_payload_tensor_skips_the_batch_layer(pair: tuple[Pipe, Pipe],
                                                                     monkeypatch: pytest.MonkeyPatch):
    """A stream's ``send_tensor_async`` of a CPU payload tensor is one engine call with no batch layer
    (``_send_async``); every other kind of tensor still goes through it, and the bytes arrive alike."""
    a, b = pair
    batch = Pipe._send_async
    batched: list[int] = []

    def counting(self: Pipe, sends: Any, *rest: Any) -> Any:
        batched.append(len(sends))
        return batch(self, sends, *rest)

    monkeypatch.setattr(Pipe, "_send_async", counting)
    sent = _payloads()
    hs = [b.send_tensor_async(t) for t in sent]
    got = [a.recv_tensor(timeout=30) for _ in sent]
    for h in hs:
        h.wait(30)
    assert batched == [] and all(_same(g, t) for g, t in zip(got, sent))
    others = [torch.arange(5), None, torch.arange(40000, dtype=torch.int32)[::2],  # inline, None, strided
              torch.arange(16384, dtype=torch.float32).numpy()]  # not a torch.Tensor
    hs = [b.send_tensor_async(t) for t in others]
    got = [a.recv_tensor(timeout=30) for _ in others]
    for h in hs:
        h.wait(30)
    assert batched == [1, 1, 1, 1]
    assert torch.equal(got[0], torch.arange(5)) and got[1] is None
    assert torch.equal(got[2], torch.arange(40000, dtype=torch.int32)[::2])
    assert torch.equal(got[3], torch.arange(16384, dtype=torch.float32))
    assert a.bytes_received == b.bytes_sent


def test_a_posted_batch_into_out_receives_in_the_background(pair: tuple[Pipe, Pipe]):
    """``recv_tensors_async(out=)`` keeps its promise: what it posted progresses with nobody waiting, so
    blocking sends of payload tensors to it complete before its handle is waited on (the compiled
    receive, which runs inside a wait, is only for ``recv_tensors`` / ``recv_tensor``)."""
    a, b = pair
    n = 1 << 16
    outs = [torch.empty(n) for _ in range(2)]
    h = a.recv_tensors_async(out=outs)
    src = [torch.full((n,), float(i)) for i in range(2)]
    for t in src:
        b.send_tensor(t, timeout=10)
    got = h.wait(10)
    assert all(g is o and torch.equal(o, t) for g, o, t in zip(got, outs, src))
    hs = [b.send_tensor_async(t) for t in reversed(src)]  # and the blocking form still takes its batch
    got = a.recv_tensors(out=outs, timeout=10)
    for s in hs:
        s.wait(10)
    assert all(g is o and torch.equal(o, t) for g, o, t in zip(got, outs, reversed(src)))


def _wait_parked(eng: Any, *tags: int) -> None:
    deadline = time.monotonic() + 10
    while not all(t in eng._stash for t in tags) and time.monotonic() < deadline:  # the progress thread's sweep
        time.sleep(0.02)
    assert all(t in eng._stash for t in tags), "no sweep parked the message"


def _counting_post_recv(pipe: Pipe) -> list[int]:
    """Count the ordinary receives ``pipe`` posts from now on (an instance attribute shadows the method)."""
    posted: list[int] = []
    ordinary = pipe._post_recv

    def counted(*args: Any, **kw: Any) -> Any:
        posted.append(kw.get("seq", -1))
        return ordinary(*args, **kw)

    pipe._post_recv = counted  # type: ignore[method-assign]
    return posted


def test_messages_a_sweep_parked_are_taken_without_leaving_the_compiled_receive(pair: tuple[Pipe, Pipe]):
    """A sweep can move a tensor's header and payload out of the worker into the engine's stash, where
    the compiled receive (which probes the worker) cannot see them. The compiled receive takes each parked
    message with a receive of its own (``Pipe._take_parked``) and goes on with the window's other tensors
    (sent after the sweep): no ordinary receive is posted for any of them."""
    a, b = pair
    eng = get_engine()
    src = [torch.arange(1 << 14, dtype=torch.float32) + i for i in range(3)]  # 64 KiB each: a payload
    h = b.send_tensor_async(src[0])
    seq = a._recv_seq
    _wait_parked(eng, a._tag(a._recv_tag, seq, False), a._tag(a._recv_tag, seq, True))
    posted = _counting_post_recv(a)
    outs = [torch.empty_like(t) for t in src]
    later = [b.send_tensor_async(t) for t in src[1:]]  # in the worker (or parked too) when the receive starts
    try:
        got = a.recv_tensors(out=outs, timeout=10)
    finally:
        del a._post_recv
    for s in [h, *later]:
        s.wait(10)
    assert all(g is o and torch.equal(o, t) for g, o, t in zip(got, outs, src))
    tags = [a._tag(a._recv_tag, seq + i, pay) for i in range(3) for pay in (False, True)]
    assert posted == [] and not any(t in eng._stash for t in tags), (posted, list(eng._stash))


def test_a_parked_header_of_another_shape_fails_as_the_ordinary_path_fails(pair: tuple[Pipe, Pipe]):
    """A parked header the compiled receive takes is compared with the expected bytes like one it probed:
    another shape goes to the ordinary path, which raises its RemoteProtocolError naming both shapes."""
    a, b = pair
    eng = get_engine()
    h = b.send_tensor_async(torch.zeros(4096))
    _wait_parked(eng, a._tag(a._recv_tag, a._recv_seq, False))
    posted = _counting_post_recv(a)
    try:
        with pytest.raises(RemoteProtocolError) as err:
            a.recv_tensors(out=[torch.empty(2048)], timeout=10)
    finally:
        del a._post_recv
    assert "4096" in str(err.value) and "2048" in str(err.value), err.value
    assert len(posted) == 1, posted  # the one slot, handed over with the header it took
    try:
        h.wait(10)
    except Exception:  # noqa: BLE001 - the receiver refused its payload: how the send ends is not this test's
        pass


def test_a_receiver_that_waits_for_its_sender_stays_on_the_compiled_path(pair: tuple[Pipe, Pipe]):
    """A window whose spin ends with nothing arrived (the receiver came first, as a decode waiting for
    its KV does) sleeps in the engine's wait until its next message arrives, then goes on in C: no
    ordinary receive is posted, whether the sender is late for the first tensor or between two."""
    a, b = pair
    src = [torch.arange(1 << 14, dtype=torch.float32) + i for i in range(3)]  # 64 KiB each: a payload
    outs = [torch.empty_like(t) for t in src]
    posted = _counting_post_recv(a)
    sent: list[Any] = []

    def late_sender() -> None:
        time.sleep(0.3)
        sent.append(b.send_tensor_async(src[0]))
        time.sleep(0.3)
        sent.extend(b.send_tensor_async(t) for t in src[1:])

    sender = threading.Thread(target=late_sender)
    sender.start()
    try:
        t0 = time.monotonic()
        got = a.recv_tensors(out=outs, timeout=10)
        took = time.monotonic() - t0
    finally:
        sender.join()
        del a._post_recv
    for h in sent:
        h.wait(10)
    assert all(g is o and torch.equal(o, t) for g, o, t in zip(got, outs, src))
    assert posted == [] and took >= 0.5, (posted, took)


def test_a_compiled_receive_that_waits_in_vain_times_out_naming_the_peer_and_breaks_the_pipe(
        pair: tuple[Pipe, Pipe]):
    """The compiled receive's sleep has the ordinary wait's deadline and errors: a receive into out that
    nothing arrives for raises PeerTimeoutError naming the peer, and the pipe is broken after it."""
    a, b = pair
    t0 = time.monotonic()
    with pytest.raises(PeerTimeoutError) as err:
        a.recv_tensors(out=[torch.empty(1 << 14)], timeout=0.5)
    took = time.monotonic() - t0
    assert 0.4 < took < 5 and a.peer in str(err.value) and "breaks the pipe" in str(err.value), (took, err.value)
    with pytest.raises(PeerError):
        a.recv_tensors(out=[torch.empty(1 << 14)], timeout=1)


def test_a_header_the_small_receive_hands_over_is_decoded_once(pair: tuple[Pipe, Pipe],
                                                               monkeypatch: pytest.MonkeyPatch):
    """``recv_tensor()`` / ``recv_message()`` take the next header through the compiled small receive; one with
    payloads to follow goes on to the ordinary path, which uses the header already decoded (its checks
    and tensors unchanged)."""
    from transport import _envelope

    a, b = pair
    decodes: list[int] = []
    decode = _envelope.decode_header

    def counting(*args: Any, **kw: Any) -> Any:
        decodes.append(1)
        return decode(*args, **kw)

    monkeypatch.setattr(_envelope, "decode_header", counting)
    t = torch.arange(1 << 14, dtype=torch.int32)  # a payload
    for i in range(3):
        h = b.send_tensor_async(t + i)
        time.sleep(0.05)  # arrived: the small receive takes its header at once
        decodes.clear()
        got = a.recv_tensor(timeout=10)
        h.wait(10)
        assert torch.equal(got, t + i) and len(decodes) == 1, decodes
    h = b.send_message_async(b"body", [t, torch.arange(3)])
    time.sleep(0.05)
    decodes.clear()
    body, ts = a.recv_message(timeout=10)
    h.wait(10)
    assert body == b"body" and torch.equal(ts[0], t) and torch.equal(ts[1], torch.arange(3))
    assert len(decodes) == 1, decodes


def test_compiled_receives_reuse_their_header_frames_until_one_goes_to_the_ordinary_path(
        pair: tuple[Pipe, Pipe], monkeypatch: pytest.MonkeyPatch):
    """Batches into ``out`` and small receives reuse one set of header frames per pipe; a hand-over that gives
    a frame to the ordinary path (here: a header other than the expected one) leaves that frame to it, and
    the next compiled receive takes new ones."""
    a, b = pair
    n = 1 << 14
    outs = [torch.empty(n) for _ in range(4)]
    src = [torch.full((n,), float(i)) for i in range(4)]
    for _ in range(3):
        hs = [b.send_tensor_async(t) for t in src]
        a.recv_tensors(out=outs, timeout=10)
        for h in hs:
            h.wait(10)
        assert all(torch.equal(o, t) for o, t in zip(outs, src))
        frames = a._rx_frames
        b.send_tensor(torch.arange(3))  # a small receive uses the first frame
        assert torch.equal(a.recv_tensor(timeout=10), torch.arange(3))
        assert a._rx_frames is frames and frames is not None and len(frames) >= 4
    # a None where a tensor was expected: its header is not the expected one, so the compiled receive
    # hands it over in its frame, for the ordinary path to decode
    from transport import _ucp_tag
    from transport import pipe as pipe_mod

    states: list[int] = []
    hand_over = pipe_mod.Pipe._hand_over

    def recording(self: Any, fb: Any, slots: Any) -> None:
        states.extend(c.state for c in fb.arr)
        hand_over(self, fb, slots)

    monkeypatch.setattr(pipe_mod.Pipe, "_hand_over", recording)
    b.send_tensor(None)
    got = a.recv_tensors(out=outs[:1], timeout=10)
    monkeypatch.undo()
    assert got == [None]
    assert states == [_ucp_tag.ST_HDR_OTHER]  # handed over with its header in the frame
    assert a._rx_frames is None  # its frame went with the ordinary receive
    hs = [b.send_tensor_async(t) for t in src]
    a.recv_tensors(out=outs, timeout=10)
    for h in hs:
        h.wait(10)
    assert all(torch.equal(o, t) for o, t in zip(outs, src))
    assert a._rx_frames is not None and a._rx_frames is not frames


def background_receiver(q: Any, fast: str) -> None:
    """Listens, receives four 4 MiB tensors into ``out`` over tcp and checks them, then waits for the sender's word."""
    os.environ["UCX_TLS"] = "tcp"

    def body() -> dict:
        p = Pipe.listen(timeout_s=60)
        q.put(("addr", p.address))
        p.wait_connected(60)
        try:
            outs = [torch.empty(1 << 20) for _ in range(4)]
            p.recv_tensors(out=outs, timeout=60)
            ok = all(torch.equal(o, torch.full((1 << 20,), float(i))) for i, o in enumerate(outs))
            p.recv_tensor(timeout=60)  # the sender saw its handles done
            return {"ok": ok}
        finally:
            p.close()

    _report(q, fast, body)


def background_sender(q: Any, fast: str, address: str) -> None:
    """Posts four 4 MiB sends over tcp with send_tensor_async and never waits on them: reports whether
    every handle came to ``done()`` while this thread only slept (the progress thread moved them)."""
    os.environ["UCX_TLS"] = "tcp"

    def body() -> dict:
        p = Pipe.connect(address, timeout_s=60)
        try:
            hs = [p.send_tensor_async(torch.full((1 << 20,), float(i))) for i in range(4)]
            eng = get_engine()
            with eng._lock:  # in flight (4 MiB over tcp cannot complete at posting) and tracked
                tracked = bool(eng._pending) and not all(h.done() for h in hs)
            t0 = time.monotonic()
            while not all(h.done() for h in hs) and time.monotonic() - t0 < 20:
                time.sleep(0.01)
            done = all(h.done() for h in hs)
            p.send_tensor(None, timeout=60)
            return {"tracked": tracked, "done": done, "after": time.monotonic() - t0}
        finally:
            p.close()

    _report(q, fast, body)


@pytest.mark.parametrize("fast", ["0", "1"])
def test_background_sends_complete_with_nobody_waiting(peers: Peers, fast: str):
    """send_tensor_async's promise: its transfer progresses while the caller does something else (here,
    sleeps); the compiled path's sends are tracked together (one op for all of them) and still do."""
    rx = peers.start(background_receiver, fast)
    address = peers.expect(rx, "addr", timeout=60)
    tx = peers.start(background_sender, fast, address)
    sent = peers.expect(tx, "ok", timeout=90)
    assert sent["tracked"] and sent["done"] and sent["after"] < 10, sent
    assert peers.expect(rx, "ok", timeout=60) == {"ok": True}


def test_a_stalled_send_does_not_hold_back_the_sends_of_other_pipes(pair: tuple[Pipe, Pipe]):
    """The compiled path's background sends are freed in posting order: a 1 MiB send nobody receives
    (the head) must not keep every later send of another pipe, and its tensor, queued behind it."""
    a, b = pair
    eng = get_engine()
    stalled = b.send_tensor_async(torch.ones(1 << 18))  # a never receives it
    with _pair() as (c, d):
        t = torch.arange(1 << 14, dtype=torch.float32)
        out = torch.empty_like(t)
        for _ in range(300):  # each left to the progress thread (never waited), then received
            d.send_tensor_async(t.clone())
            assert torch.equal(c.recv_tensor(out=out, timeout=30), t)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with eng._lock:
                queued = len(eng._sends.queue)
            if queued <= 2 * 64:
                break
            time.sleep(0.02)
    assert not stalled.done() and queued <= 2 * 64, queued
