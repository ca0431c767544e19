"""Envelope rules (message codec, send header) and the control wire, tested without UCX or sockets."""

from __future__ import annotations

import struct

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from transport import LocalUsageError, RemoteProtocolError, VersionMismatchError
from transport import _envelope as codec
from transport import _wire


def _frame(h: codec.Header, inline: bytes | None = None) -> memoryview:
    buf = np.zeros(codec.HEADER_FRAME_SIZE, dtype=np.uint8)
    codec.encode_header(memoryview(buf), h, [inline] if inline else [])
    return memoryview(buf)


def _one(seq: int, dtype: str, shape: list[int], nbytes: int, inline: bool = False) -> codec.Header:
    return codec.Header(seq, [codec.TensorSpec(dtype, shape, nbytes, "cpu", inline)])


def test_header_round_trip_and_inline_payload():
    h = _one(7, "bfloat16", [2, 3], 12, inline=True)
    got, inline = codec.decode_header(_frame(h, b"x" * 12), "peer", 7, 1 << 20)
    assert got == h and bytes(inline[0]) == b"x" * 12


def test_one_header_describes_every_tensor_of_a_message():
    specs = [codec.TensorSpec("float32", [2], 8, "cpu", True), None,
             codec.TensorSpec("int64", [1 << 20], 8 << 20, "cuda", False), codec.TensorSpec("uint8", [3], 3, "cpu", True)]
    h = codec.Header(3, specs, b"body")
    buf = np.zeros(codec.HEADER_FRAME_SIZE, dtype=np.uint8)
    codec.encode_header(memoryview(buf), h, [b"a" * 8, b"xyz"])
    got, inline = codec.decode_header(memoryview(buf), "peer", 3, 1 << 30)
    assert got == h and got.payloads == 1 and got.body == b"body"
    assert [None if v is None else bytes(v) for v in inline] == [b"a" * 8, None, None, b"xyz"]
    # a hostile count of tensors is refused by the header's own frame size, and the message codec caps bodies
    with pytest.raises(LocalUsageError, match="does not fit"):
        codec.encode_header(memoryview(buf), codec.Header(0, [specs[2]] * 1000))


@pytest.mark.parametrize(
    "header,match",
    [
        (_one(1, "float32", [4], 16), "out-of-order"),
        (_one(0, "float99", [4], 16), "unknown dtype"),
        (_one(0, "float32", [4], 17), "says 17 bytes"),
        (_one(0, "float32", [-4], -16), "invalid shape"),
        (_one(0, "uint8", [1 << 40], 1 << 40), "invalid shape"),
        (_one(0, "float32", [1 << 29], 1 << 31), "limit"),
        (_one(0, "uint8", [100], 100, inline=True), None),
    ],
)
def test_bad_headers_are_rejected_naming_the_peer(header, match):
    frame = _frame(header)
    if match is None:  # inline claim past the frame's real payload is fine only if it fits the frame
        codec.decode_header(frame, "peer-x", 0, 1 << 30)
        return
    with pytest.raises(RemoteProtocolError, match=match) as ei:
        codec.decode_header(frame, "peer-x", 0, 1 << 30)
    assert "peer-x" in str(ei.value)


def test_body_length_past_frame_is_rejected():
    buf = np.zeros(64, dtype=np.uint8)
    struct.pack_into("<I", buf, 0, 10_000)
    with pytest.raises(RemoteProtocolError, match="claims"):
        codec.decode_header(memoryview(buf), "p", 0, 1 << 30)


def test_every_dtype_has_a_wire_name_and_itemsize():
    for name, dt in codec.DTYPES.items():
        assert codec.dtype_name(dt) == name
        t = torch.zeros(3, dtype=dt)
        assert codec.byte_view(t).numel() == 3 * dt.itemsize


def test_version_mismatch_names_both_versions():
    frames = _wire.encode(_wire.Heartbeat())
    frames[0] = struct.pack("<4sI", _wire.MAGIC, 42)
    with pytest.raises(VersionMismatchError, match=f"v42.*v{_wire.PROTOCOL_VERSION}"):
        _wire.decode(frames, "peer")


class _Ping(msgspec.Struct, tag=True, frozen=True):
    n: int


class _ChannelError(Exception):
    pass


def test_message_codec_round_trip_and_any_decoder_exception_is_the_channel_error():
    c = codec.MessageCodec(b"TST\x00", 3, _Ping, what="test message", max_body=256, error=_ChannelError,
                           version_error=_ChannelError)
    assert c.decode(c.encode(_Ping(5)), "p") == _Ping(5)
    nested = c.preamble + b"\x91" * 100_000  # deep nesting: RecursionError inside msgspec
    for bad, match in [(b"", "shorter"), (b"XXXX" + c.encode(_Ping(1))[4:], "bad magic"),
                       (struct.pack("<4sHH", b"TST\x00", 9, 0), "v9.*v3"), (c.preamble + b"\xc1", "malformed"),
                       (nested[:300], "oversized|malformed"), (c.preamble + msgspec.msgpack.encode({"x": 1}), "malformed")]:
        with pytest.raises(_ChannelError, match=match):
            c.decode(bad, "peer-q")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=4))
def test_fuzz_control_decoder_never_crashes(frames):
    try:
        _wire.decode(frames, "fuzz")
    except RemoteProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=600))
def test_fuzz_message_codec_never_raises_anything_but_its_error(data):
    c = codec.MessageCodec(b"TST\x00", 3, _Ping, what="test message")
    for raw in (data, c.preamble + data):
        try:
            c.decode(raw, "fuzz")
        except RemoteProtocolError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=600))
def test_fuzz_header_decoder_never_crashes(data):
    buf = np.frombuffer(data + b"\x00" * 8, dtype=np.uint8)
    try:
        codec.decode_header(memoryview(buf), "fuzz", 0, 1 << 20)
    except RemoteProtocolError:
        pass


_SPEC = st.builds(
    codec.TensorSpec,
    st.sampled_from(sorted(codec.DTYPES)),
    st.lists(st.sampled_from([0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**40]), max_size=18),
    st.sampled_from([0, 5, 127, 128, 200, 70000, 2**33]),
    st.sampled_from(["cpu", "cuda", "x" * 31, "y" * 32, "z" * 300]),
    st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(seq=st.sampled_from([0, 1, 127, 128, 255, 256, 2**23 - 1]),
       specs=st.lists(st.one_of(st.none(), _SPEC), max_size=20),
       body=st.sampled_from([None, b"", b"a" * 31, b"a" * 255, b"a" * 256, b"b" * 70000]))
def test_header_size_is_the_encoded_length(seq: int, specs: list, body: bytes | None):
    """The send path sizes a header without encoding it: the figure must be msgpack's exact length."""
    h = codec.Header(seq, specs, body)
    assert codec.header_size(h) == len(codec.encode_header_bytes(h))
