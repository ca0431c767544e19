"""Tensor headers and byte views: how a tensor's identity travels beside its bytes.

A tensor crosses the data plane as a fixed-size *header frame* followed, when it
does not fit inline, by its raw bytes. The header frame is::

    u32 little-endian body length | msgpack TensorHeader | inline payload (optional)

Nothing here touches UCX, so the rules (what a valid header is, how big a claim
may be) are tested without it.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import msgspec
import torch

from .errors import LocalUsageError, RemoteProtocolError

#: Size of the buffer every header is received into; small tensors ride inline.
HEADER_FRAME_SIZE = 8192
_LEN = struct.Struct("<I")
MAX_NDIM = 64


class TensorHeader(msgspec.Struct, frozen=True, array_like=True):
    """What a receiver needs to allocate and check a tensor before its bytes arrive."""

    seq: int
    none: bool
    dtype: str = ""
    shape: list[int] = []
    nbytes: int = 0
    inline: bool = False


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(TensorHeader)

_DTYPE_NAMES = [
    "float64", "float32", "float16", "bfloat16", "complex128", "complex64", "complex32",
    "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
]
DTYPES: dict[str, torch.dtype] = {n: getattr(torch, n) for n in _DTYPE_NAMES if isinstance(getattr(torch, n, None), torch.dtype)}
_DTYPE_TO_NAME = {d: n for n, d in DTYPES.items()}
_ITEMSIZE = {n: d.itemsize for n, d in DTYPES.items()}
INLINE_LIMIT = HEADER_FRAME_SIZE - _LEN.size - 512  # room left for the header itself


def as_torch(obj: Any) -> torch.Tensor:
    """Return ``obj`` as a torch tensor sharing its memory (torch, numpy, cupy, DLPack)."""
    if isinstance(obj, torch.Tensor):
        return obj
    mod = type(obj).__module__
    if mod.startswith("numpy"):
        import numpy as np

        if isinstance(obj, np.ndarray):
            return torch.from_numpy(obj) if obj.dtype != np.bool_ else torch.from_numpy(obj.view(np.uint8)).view(torch.bool)
    if hasattr(obj, "__dlpack__"):
        return torch.from_dlpack(obj)
    if hasattr(obj, "__cuda_array_interface__"):
        return torch.as_tensor(obj, device="cuda")
    raise LocalUsageError(f"cannot send an object of type {type(obj).__name__}: expected a torch tensor, numpy or cupy array")


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of ``dtype``; raises :class:`LocalUsageError` for unsupported dtypes."""
    try:
        return _DTYPE_TO_NAME[dtype]
    except KeyError:
        raise LocalUsageError(f"dtype {dtype} is not supported by the transport") from None


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's memory (no copy)."""
    if not t.is_contiguous():
        raise LocalUsageError("byte_view needs a contiguous tensor")
    return t.reshape(-1).view(torch.uint8)


def ucx_buffer(t: torch.Tensor) -> Any:
    """An object UCX can read or write in place: a numpy view for CPU, the tensor itself for CUDA."""
    b = byte_view(t)
    return b.numpy() if b.device.type == "cpu" else b


def encode_header(frame: memoryview, header: TensorHeader, inline: bytes | memoryview | None = None) -> int:
    """Write ``header`` (and ``inline`` bytes) into ``frame``; return the number of bytes used."""
    body = _encoder.encode(header)
    end = _LEN.size + len(body)
    n_inline = 0 if inline is None else len(inline)
    if end + n_inline > len(frame):
        raise LocalUsageError(f"tensor header too large ({end + n_inline} bytes > frame {len(frame)}); too many dims?")
    _LEN.pack_into(frame, 0, len(body))
    frame[_LEN.size:end] = body
    if n_inline:
        frame[end:end + n_inline] = inline
    return end + n_inline


def decode_header(frame: memoryview, peer: str, expected_seq: int, max_nbytes: int) -> tuple[TensorHeader, memoryview]:
    """Parse and validate a header frame from ``peer``; return it with its inline payload view.

    Rejects (with :class:`RemoteProtocolError`) a body length past the frame, an
    undecodable body, an out-of-order sequence number, an unknown dtype, a shape
    that is negative, too deep or has a dimension above ``max_nbytes`` (even
    beside a zero), an ``nbytes`` that disagrees with dtype and shape,
    and a claim above ``max_nbytes``; nothing is allocated from an unchecked length.
    """
    if len(frame) < _LEN.size:
        raise RemoteProtocolError(f"truncated tensor header from {peer}")
    (n,) = _LEN.unpack_from(frame, 0)
    if n > len(frame) - _LEN.size:
        raise RemoteProtocolError(f"tensor header from {peer} claims {n} bytes, frame holds {len(frame) - _LEN.size}")
    try:
        h = _decoder.decode(frame[_LEN.size:_LEN.size + n])
    except msgspec.DecodeError as exc:
        raise RemoteProtocolError(f"malformed tensor header from {peer}: {exc}") from None
    if h.seq != expected_seq:
        raise RemoteProtocolError(f"out-of-order tensor from {peer}: got seq {h.seq}, expected {expected_seq}")
    if h.none:
        return h, frame[0:0]
    if h.dtype not in DTYPES:
        raise RemoteProtocolError(f"tensor header from {peer} names unknown dtype {h.dtype!r}")
    if len(h.shape) > MAX_NDIM or any((not isinstance(s, int)) or not 0 <= s <= max_nbytes for s in h.shape):
        raise RemoteProtocolError(f"tensor header from {peer} has an invalid shape {h.shape[:8]}")
    expect = math.prod(h.shape) * _ITEMSIZE[h.dtype]
    if h.nbytes != expect:
        raise RemoteProtocolError(
            f"tensor header from {peer} says {h.nbytes} bytes but dtype {h.dtype} and shape {h.shape} make {expect}"
        )
    if h.nbytes > max_nbytes:
        raise RemoteProtocolError(f"tensor from {peer} claims {h.nbytes} bytes, above this pipe's limit of {max_nbytes}")
    start = _LEN.size + n
    if h.inline:
        if start + h.nbytes > len(frame):
            raise RemoteProtocolError(f"inline tensor from {peer} overruns its frame ({h.nbytes} bytes)")
        return h, frame[start:start + h.nbytes]
    return h, frame[0:0]
