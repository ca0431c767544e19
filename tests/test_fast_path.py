"""The compiled one-message path (transport._ucp_tag) against the ordinary one: same wire, same rules.

One process, a real pipe pair over real UCX; the engine is the process's, so switching
its ``tag_fast`` off between calls makes either end take the ordinary Python path.
"""

from __future__ import annotations

import ctypes
import struct
import time
from typing import Any, Iterator

import pytest
import torch

from transport import PeerTimeoutError, Pipe
from transport._engine import get_engine


@pytest.fixture()
def pair() -> Iterator[tuple[Pipe, Pipe]]:
    if get_engine().tag_fast is None:
        pytest.skip("the fast-path helper could not be built here (no C compiler?)")
    a = Pipe.listen(timeout_s=30)
    b = Pipe.connect(a.address, timeout_s=30)
    a.wait_connected(30)
    try:
        yield a, b
    finally:
        b.close()
        a.close()


def _sends() -> list[Any]:
    return [torch.arange(3, dtype=torch.int64), torch.zeros(0, 4), torch.ones(2, 3, dtype=torch.bfloat16),
            torch.tensor(7), torch.full((2048,), 3, dtype=torch.int32),  # 8 KiB: too big to ride inline
            torch.arange(1 << 18, dtype=torch.float32)]  # 1 MiB: header then payload


def _inline_messages() -> list[tuple[bytes, list[Any]]]:
    """Messages whose tensors all ride inline (the lookup wire's shapes among them)."""
    return [(b"", []), (b"only a body" * 50, []),
            (b"q", [torch.arange(16, dtype=torch.int64), None, torch.zeros(0, 3), torch.ones(2, 2, dtype=torch.bfloat16)]),
            (b"r", [torch.tensor(True), torch.arange(6, dtype=torch.float16).view(2, 3)]),
            (b"x" * 100, [torch.full((1800,), 7, dtype=torch.int32)])]  # ~7.3 KiB: just inline


@pytest.mark.parametrize("send_fast,recv_fast", [(True, True), (True, False), (False, True)])
def test_fast_and_ordinary_paths_speak_the_same_wire(pair: tuple[Pipe, Pipe], send_fast: bool, recv_fast: bool):
    a, b = pair
    eng = get_engine()
    helper = eng.tag_fast
    try:
        for round_ in range(3):
            for t in _sends():
                eng.tag_fast = helper if send_fast else None
                # one thread: a large send (rendezvous) completes only once the receive is posted
                h = b.send_tensor_async(t) if t.nbytes > 4096 else b.send_tensor(t)
                eng.tag_fast = helper if recv_fast else None
                got = a.recv_tensor(timeout=30)
                if h is not None:
                    h.wait(30)
                assert got is not None and got.dtype == t.dtype and torch.equal(got, t), (round_, t.shape)
            eng.tag_fast = helper if send_fast else None
            h = b.send_message_async(b"body", [torch.ones(3), None, torch.arange(1 << 16)])
            eng.tag_fast = helper if recv_fast else None
            body, tensors = a.recv_message(timeout=30)
            h.wait(30)
            eng.tag_fast = helper if send_fast else None
            b.send_tensor(torch.tensor([1.5]))
            eng.tag_fast = helper if recv_fast else None
            assert body == b"body" and tensors[1] is None and torch.equal(tensors[2], torch.arange(1 << 16))
            out = torch.empty(1)
            assert a.recv_tensor(out=out, timeout=30) is out and out.item() == 1.5
            for body, ts in _inline_messages():
                eng.tag_fast = helper if send_fast else None
                b.send_message(body, ts)
                eng.tag_fast = helper if recv_fast else None
                got_body, got = a.recv_message(timeout=30)
                assert got_body == body and len(got) == len(ts)
                for g, t in zip(got, ts):
                    assert (g is None and t is None) or (g.dtype == t.dtype and torch.equal(g, t))
            eng.tag_fast = helper if send_fast else None
            b.send_tensors([torch.arange(4), None, torch.tensor([2.5])])
            eng.tag_fast = helper if recv_fast else None
            got = [a.recv_tensor(timeout=30) for _ in range(3)]
            assert torch.equal(got[0], torch.arange(4)) and got[1] is None and got[2].item() == 2.5
    finally:
        eng.tag_fast = helper
    assert a.bytes_received == b.bytes_sent


def test_small_messages_take_one_native_call_each(pair: tuple[Pipe, Pipe], monkeypatch: pytest.MonkeyPatch):
    a, b = pair
    eng = get_engine()

    def refuse(*args: Any, **kw: Any) -> Any:
        raise AssertionError("a small message took the ordinary path")

    monkeypatch.setattr(eng, "tag_send", refuse)
    monkeypatch.setattr(eng, "tag_recv", refuse)
    for i in range(50):
        b.send_tensor(torch.tensor([i]))
        assert a.recv_tensor(timeout=30).item() == i
        a.send_tensor(torch.tensor([-i]))
        assert b.recv_tensor(out=torch.empty(1, dtype=torch.int64), timeout=30).item() == -i
        b.send_message(b"ask %d" % i, [torch.tensor([i]), None, torch.ones(3)])
        body, ts = a.recv_message(timeout=30, max_tensors=4)
        assert body == b"ask %d" % i and ts[0].item() == i and ts[1] is None
        a.send_message(b"answer")
        assert b.recv_message(timeout=30) == (b"answer", [])
        b.send_tensors([torch.tensor([i]), torch.tensor([i + 1])])
        assert [a.recv_tensor(timeout=30).item() for _ in range(2)] == [i, i + 1]


def test_fast_sends_put_the_ordinary_paths_bytes_on_the_wire(pair: tuple[Pipe, Pipe], monkeypatch: pytest.MonkeyPatch):
    """Each send's frame, byte for byte, from both paths (the sequence number aside)."""
    a, b = pair
    eng = get_engine()
    helper = eng.tag_fast
    frames: list[bytes] = []
    send_frame, tag_send = eng.send_frame, eng.tag_send

    def record_fast(ep: Any, tag: int, header: bytes, data: Any, nbytes: int, *rest: Any) -> Any:
        raw = b"" if not nbytes else data if isinstance(data, bytes) else ctypes.string_at(data, nbytes)
        frames.append(struct.pack("<I", len(header)) + header + raw)
        return send_frame(ep, tag, header, data, nbytes, *rest)

    def record_ordinary(ep: Any, buf: Any, tag: int) -> Any:
        frames.append(bytes(buf))
        return tag_send(ep, buf, tag)

    monkeypatch.setattr(eng, "send_frame", record_fast)
    monkeypatch.setattr(eng, "tag_send", record_ordinary)
    sends = [*_inline_messages(), (None, [torch.tensor([3.25])]), (None, [torch.zeros(2, 0)]), (None, [None])]
    try:
        for body, ts in sends:
            for fast in (True, False):
                eng.tag_fast = helper if fast else None
                n = len(frames)
                seq = b._send_seq
                if body is None:
                    b.send_tensor(ts[0])
                else:
                    b.send_message(body, ts)
                assert len(frames) == n + 1, "one frame per all-inline send"
                assert frames[-1][5] == seq  # msgpack: u32 length, array marker, then the (small) sequence number
            eng.tag_fast = helper
            fast_frame, ordinary_frame = frames[-2], frames[-1]
            assert fast_frame[:5] + fast_frame[6:] == ordinary_frame[:5] + ordinary_frame[6:], body
            for _ in range(2):
                a.recv_tensor(timeout=30) if body is None else a.recv_message(timeout=30)
    finally:
        eng.tag_fast = helper


def test_a_message_a_sweep_parked_is_still_received(pair: tuple[Pipe, Pipe]):
    a, b = pair
    eng = get_engine()
    b.send_tensor(torch.tensor([42]))
    tag = a._tag(a._recv_tag, a._recv_seq, False)
    deadline = time.monotonic() + 10
    while tag not in eng._stash and time.monotonic() < deadline:  # the progress thread's sweep parks it
        time.sleep(0.02)
    assert tag in eng._stash
    assert a.recv_tensor(timeout=30).item() == 42
    assert tag not in eng._stash


def test_a_fast_receive_that_times_out_is_not_fatal(pair: tuple[Pipe, Pipe]):
    a, b = pair
    t0 = time.monotonic()
    with pytest.raises(PeerTimeoutError):
        a.recv_tensor(timeout=0.3)
    assert 0.25 < time.monotonic() - t0 < 5
    b.send_tensor(torch.tensor([5]))
    assert a.recv_tensor(timeout=30).item() == 5  # the receive that stayed posted takes it
    b.send_tensor(torch.tensor([6]))
    assert a.recv_tensor(timeout=30).item() == 6  # and the fast path is back


def test_inline_tensors_received_own_their_memory(pair: tuple[Pipe, Pipe]):
    """What lands from the reused receive frame is a copy: each tensor its own writable, contiguous memory."""
    a, b = pair
    first = [torch.arange(4, dtype=torch.int64), torch.full((2, 3), 7, dtype=torch.uint8), torch.tensor(True)]
    b.send_message(b"one", first)
    _, got = a.recv_message(timeout=30)
    b.send_message(b"two", [torch.zeros(4, dtype=torch.int64), torch.zeros((2, 3), dtype=torch.uint8),
                            torch.tensor(False)])
    _, again = a.recv_message(timeout=30)  # the same frame, overwritten
    for g, t in zip(got, first):
        assert g.dtype == t.dtype and g.shape == t.shape and g.is_contiguous() and torch.equal(g, t)
    assert len({g.data_ptr() for g in got + again}) == 6
    got[0] += 1  # writable, and nobody else's memory
    assert torch.equal(got[0], torch.arange(1, 5)) and torch.equal(again[0], torch.zeros(4, dtype=torch.int64))


def _outs() -> list[Any]:
    """Receive buffers of the inline sizes: dtypes numpy lacks, 0-d, empty, just under the inline limit."""
    return [torch.empty(1), torch.empty(3, dtype=torch.int64), torch.empty(2, 3, dtype=torch.bfloat16),
            torch.empty((), dtype=torch.bool), torch.empty(0, 4), torch.empty(1800, dtype=torch.int32),
            torch.empty(2, dtype=torch.complex64)]


@pytest.mark.parametrize("send_fast", [True, False])
def test_a_small_receive_into_out_lands_without_a_decode(pair: tuple[Pipe, Pipe], monkeypatch: pytest.MonkeyPatch,
                                                         send_fast: bool):
    """The frame every sender writes for ``out``'s dtype and shape lands in ``out`` in C: nothing decoded."""
    a, b = pair
    eng = get_engine()
    helper = eng.tag_fast

    def refuse(*args: Any, **kw: Any) -> Any:
        raise AssertionError("a frame that is exactly the expected one was decoded")

    monkeypatch.setattr(a, "_decode_small", refuse)
    try:
        for round_ in range(3):
            for out in _outs():
                sent = torch.randn(out.shape).to(out.dtype) if out.numel() else torch.empty(out.shape, dtype=out.dtype)
                out.zero_()
                eng.tag_fast = helper if send_fast else None
                b.send_tensor(sent)
                eng.tag_fast = helper
                assert a.recv_tensor(out=out, timeout=30) is out
                assert torch.equal(out, sent), (round_, out.dtype, out.shape)
    finally:
        eng.tag_fast = helper
    assert a.bytes_received == b.bytes_sent


def _raw_frame(header: bytes, data: bytes) -> bytes:
    return struct.pack("<I", len(header)) + header + data


@pytest.mark.parametrize("case", ["dtype", "shape", "none", "message", "longer", "shorter", "payload"])
def test_a_frame_other_than_the_expected_one_is_decoded_as_before(pair: tuple[Pipe, Pipe], case: str):
    """Anything but the exact frame goes to the ordinary decode, which refuses what it refused (``out``
    untouched) and takes what it took."""
    from transport import _envelope as codec
    from transport.errors import RemoteProtocolError

    a, b = pair
    eng = get_engine()
    out = torch.full((4,), 9, dtype=torch.int32)
    seq = b._send_seq
    spec = codec.TensorSpec("int32", [4], 16, "cpu", True)
    good = codec.encode_header_bytes(codec.Header(seq, [spec], None))
    frame, keep = None, []
    if case == "dtype":
        b.send_tensor(torch.zeros(4, dtype=torch.float32))
    elif case == "shape":
        b.send_tensor(torch.zeros(2, 2, dtype=torch.int32))
    elif case == "none":
        b.send_tensor(None)
    elif case == "message":
        b.send_message(b"body", [torch.zeros(4, dtype=torch.int32)])
    elif case == "payload":  # too big to ride inline: a payload follows its header
        b.send_tensor_async(torch.zeros(1 << 16, dtype=torch.int32))
    else:  # the expected header, with a byte too many or too few behind it
        frame = _raw_frame(good, bytes(range(17 if case == "longer" else 15)))
    if frame is not None:
        keep = [frame, eng.tag_send(b._ep, frame, b._tag(b._send_tag, seq, False))]
        b._send_seq += 1
    if case == "none":
        assert a.recv_tensor(out=out, timeout=30) is None  # what the ordinary path returns for a None
    elif case == "longer":  # the ordinary path's rule: bytes past the tensors' are not looked at
        assert a.recv_tensor(out=out, timeout=30) is out
        assert out.numpy().tobytes() == bytes(range(16))
        return
    else:
        with pytest.raises(RemoteProtocolError) as exc:
            a.recv_tensor(out=out, timeout=30)
        assert a.peer in str(exc.value)
    assert torch.equal(out, torch.full((4,), 9, dtype=torch.int32))


def test_a_receive_without_out_lands_a_repeated_shape_without_a_decode(pair: tuple[Pipe, Pipe],
                                                                      monkeypatch: pytest.MonkeyPatch):
    """Without ``out``, the tensor of the last one's dtype and shape is guessed: a stream of one shape is
    decoded once, and whatever else comes (another shape or dtype, None, a payload, a message) is decoded
    and received as before."""
    a, b = pair
    decoded: list[int] = []
    decode = a._decode_small

    def counting(frame: Any, n: int, seq: int) -> Any:
        decoded.append(seq)
        return decode(frame, n, seq)

    monkeypatch.setattr(a, "_decode_small", counting)
    got = []
    for i in range(20):
        t = torch.full((2, 3), i, dtype=torch.int16)
        b.send_tensor(t)
        got.append(a.recv_tensor(timeout=30))
        assert got[-1].dtype == torch.int16 and torch.equal(got[-1], t)
    assert len(decoded) == 1, decoded  # the first only
    assert len({g.data_ptr() for g in got}) == len(got)  # each its own memory
    got[0].add_(1)
    assert torch.equal(got[1], torch.full((2, 3), 1, dtype=torch.int16))
    sends = [torch.arange(5, dtype=torch.float64), torch.arange(6, dtype=torch.int16).view(3, 2), None,
             torch.ones(1 << 16, dtype=torch.uint8), torch.zeros(2, 3, dtype=torch.int16)]
    for t in sends:
        h = b.send_tensor_async(t)
        g = a.recv_tensor(timeout=30)
        h.wait(30)
        assert (g is None and t is None) or (g.dtype == t.dtype and torch.equal(g, t))
    b.send_message(b"m", [torch.zeros(2, 3, dtype=torch.int16)])
    assert a.recv_message(timeout=30)[0] == b"m"
    b.send_tensor(torch.ones(2, 3, dtype=torch.int16))
    assert torch.equal(a.recv_tensor(device="cpu", timeout=30), torch.ones(2, 3, dtype=torch.int16))
    assert a.bytes_received == b.bytes_sent


@pytest.mark.parametrize("size", [4, 8192])  # inline, payload
def test_a_lazy_view_as_out_is_refused_before_anything_is_received(pair: tuple[Pipe, Pipe], size: int):
    """A conjugate or negative view's memory is not its values: ``out`` such a view is a caller's error,
    raised before the receive takes anything (the message waits for the next receive, the pipe works)."""
    from transport.errors import LocalUsageError

    a, b = pair
    t = torch.randn(size, dtype=torch.complex64)
    h = b.send_tensor_async(t)
    for out in (torch.zeros(size, dtype=torch.complex64).conj(), torch.zeros(size)._neg_view()):
        with pytest.raises(LocalUsageError, match="lazy conjugate or negative view"):
            a.recv_tensor(out=out, timeout=5)
        with pytest.raises(LocalUsageError, match="lazy conjugate or negative view"):
            a.recv_tensors(out=[out], timeout=5)
    into = torch.zeros(size, dtype=torch.complex64)
    assert a.recv_tensor(out=into, timeout=30) is into and torch.equal(into, t)
    h.wait(30)
