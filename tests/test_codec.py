"""Wire and tensor-header rules, tested without UCX or sockets."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from transport import RemoteProtocolError, VersionMismatchError
from transport import _tensor_codec as codec
from transport import _wire


def _frame(h: codec.TensorHeader, inline: bytes | None = None) -> memoryview:
    buf = np.zeros(codec.HEADER_FRAME_SIZE, dtype=np.uint8)
    codec.encode_header(memoryview(buf), h, inline)
    return memoryview(buf)


def test_header_round_trip_and_inline_payload():
    h = codec.TensorHeader(seq=7, none=False, dtype="bfloat16", shape=[2, 3], nbytes=12, inline=True)
    got, inline = codec.decode_header(_frame(h, b"x" * 12), "peer", 7, 1 << 20)
    assert got == h and bytes(inline) == b"x" * 12


@pytest.mark.parametrize(
    "header,match",
    [
        (codec.TensorHeader(seq=1, none=False, dtype="float32", shape=[4], nbytes=16), "out-of-order"),
        (codec.TensorHeader(seq=0, none=False, dtype="float99", shape=[4], nbytes=16), "unknown dtype"),
        (codec.TensorHeader(seq=0, none=False, dtype="float32", shape=[4], nbytes=17), "says 17 bytes"),
        (codec.TensorHeader(seq=0, none=False, dtype="float32", shape=[-4], nbytes=-16), "invalid shape"),
        (codec.TensorHeader(seq=0, none=False, dtype="uint8", shape=[1 << 40], nbytes=1 << 40), "invalid shape"),
        (codec.TensorHeader(seq=0, none=False, dtype="float32", shape=[1 << 29], nbytes=1 << 31), "limit"),
        (codec.TensorHeader(seq=0, none=False, dtype="uint8", shape=[100], nbytes=100, inline=True), None),
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
    with pytest.raises(VersionMismatchError, match="v42.*v1"):
        _wire.decode(frames, "peer")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=4))
def test_fuzz_control_decoder_never_crashes(frames):
    try:
        _wire.decode(frames, "fuzz")
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
