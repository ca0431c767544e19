"""The one envelope of every ucxkv wire: a typed, versioned message, and one header that carries N tensors.

Two layers, both free of UCX so their rules are tested without it:

- :class:`MessageCodec`: a typed, versioned message as bytes. An 8-byte
  preamble (4-byte magic, version ``u16``, reserved ``u16``, little-endian)
  then a msgpack body of one :class:`msgspec.Struct` (a tagged union decoded
  by one reused decoder). The preamble is checked before the body is decoded,
  so a peer of another version gets the codec's version error naming both
  versions, and *any* exception the decoder raises on hostile bytes
  (``DecodeError``, ``ValidationError``, ``RecursionError`` from deep nesting,
  ...) becomes the codec's protocol error naming the peer. The control plane
  (:mod:`transport._wire`), the lookup wire, the kvrma wire, memory
  descriptors and the bench all frame their messages with it.
- The data-plane :class:`Header`: what travels first on a pipe for each send,
  one frame ``u32 body length | msgpack Header | inline payloads``. The header
  describes every tensor that follows (:class:`TensorSpec`: dtype, shape,
  byte count, the sender's device) and optionally carries a message body
  (:meth:`transport.Pipe.send_message`); small tensors ride inline in the
  frame, the others follow as one raw payload each. A batch of N tensors is
  one header, never a header per tensor.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Optional, Sequence

import msgspec
import torch

from .errors import LocalUsageError, RemoteProtocolError, VersionMismatchError

__all__ = ["MessageCodec", "TensorSpec", "Header", "clip"]

_PREAMBLE = struct.Struct("<4sHH")
#: Bytes before every message body: magic, version, reserved.
PREAMBLE_SIZE = _PREAMBLE.size


def clip(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters: what a peer sent is never echoed back or logged at length."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


class MessageCodec:
    """Encodes and decodes one channel's typed, versioned messages (see the module docstring).

    Args:
        magic: 4 bytes that open every message of this channel.
        version: The channel's wire version; a peer with another is refused by name.
        types: The msgspec type decoded (usually a ``Union`` of tagged structs).
        what: How errors name a message of this channel (``"lookup request"``).
        max_body: Largest body accepted; a longer one is refused unread.
        error: Raised for malformed bytes (the peer's fault).
        version_error: Raised for another version (a subclass of ``error`` or not).
    """

    def __init__(self, magic: bytes, version: int, types: Any, *, what: str, max_body: int = 64 * 1024,
                 error: type[Exception] = RemoteProtocolError,
                 version_error: type[Exception] = VersionMismatchError):
        if len(magic) != 4 or not 0 < version < 1 << 16:
            raise LocalUsageError(f"a message codec needs a 4-byte magic and a u16 version, got {magic!r} v{version}")
        self.magic, self.version, self.what, self.max_body = magic, version, what, max_body
        self.error, self.version_error = error, version_error
        self.preamble = _PREAMBLE.pack(magic, version, 0)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(types)

    def encode_body(self, msg: Any) -> bytes:
        """The msgpack body of ``msg`` alone (no preamble); refuses a body above ``max_body``."""
        body = self._encoder.encode(msg)
        if len(body) > self.max_body:
            raise LocalUsageError(f"{self.what} of {len(body)} bytes exceeds the limit of {self.max_body}")
        return body

    def encode(self, msg: Any) -> bytes:
        """``msg`` as preamble plus body."""
        return self.preamble + self.encode_body(msg)

    def check_preamble(self, pre: bytes | memoryview, peer: str) -> None:
        """Raise ``error`` for a short preamble or a wrong magic, ``version_error`` for another version."""
        if len(pre) < PREAMBLE_SIZE:
            raise self.error(f"malformed {self.what} from {peer}: {len(pre)} bytes, shorter than the "
                             f"{PREAMBLE_SIZE}-byte preamble")
        magic, version, _ = _PREAMBLE.unpack_from(pre)
        if magic != self.magic:
            raise self.error(f"malformed {self.what} from {peer}: bad magic {magic!r}, expected {self.magic!r}")
        if version != self.version:
            raise self.version_error(
                f"{self.what} version mismatch with {peer}: peer speaks v{version}, we speak v{self.version}; "
                "upgrade the older side")

    def decode_body(self, body: bytes | memoryview, peer: str) -> Any:
        """Decode a body whose preamble was checked; any decoder exception becomes ``error``."""
        if len(body) > self.max_body:
            raise self.error(f"oversized {self.what} from {peer}: {len(body)} bytes, limit {self.max_body}")
        try:
            return self._decoder.decode(body)
        except Exception as exc:  # noqa: BLE001 - DecodeError, ValidationError, RecursionError, ...: the peer's fault
            raise self.error(f"malformed {self.what} from {peer}: {clip(str(exc))}") from None

    def decode(self, data: bytes | memoryview, peer: str) -> Any:
        """Check the preamble, then decode the body of ``data`` received from ``peer``."""
        if not (type(data) is bytes and data.startswith(self.preamble)):  # (the common case in one C call)
            self.check_preamble(data, peer)
        return self.decode_body(memoryview(data)[PREAMBLE_SIZE:], peer)


# -- the data-plane header ------------------------------------------------------------------
#: Size of the buffer every header is received into; small tensors ride inline.
HEADER_FRAME_SIZE = 8192
_LEN = struct.Struct("<I")
MAX_NDIM = 64
#: Room kept for the header itself when deciding what rides inline.
INLINE_LIMIT = HEADER_FRAME_SIZE - _LEN.size - 512


def rides_inline(nbytes: int, header_len: int) -> bool:
    """The inline rule, the one place it is written: tensor bytes ride inside the header frame (after
    a header of ``header_len`` bytes) iff ``nbytes`` fits what the header leaves of ``INLINE_LIMIT``.

    For a send of several tensors, ``nbytes`` is the running sum of the ones before in order plus
    this one: tensors take what the header leaves, in order (so all ride inline iff their sum does).
    """
    return nbytes <= INLINE_LIMIT - header_len


class TensorSpec(msgspec.Struct, frozen=True, array_like=True):
    """One tensor as the header describes it: enough to allocate and check it before its bytes arrive."""

    dtype: str
    shape: list[int]
    nbytes: int
    #: The sender's device type ("cpu", "cuda"): informative, the receiver picks its own.
    device: str = "cpu"
    #: Its bytes ride in the header frame (after the body) instead of a payload message of their own.
    inline: bool = False


class Header(msgspec.Struct, frozen=True, array_like=True):
    """The first frame of every send on a pipe.

    ``body`` is None for a bare tensor (:meth:`Pipe.send_tensor`, one entry in
    ``tensors``) and the message bytes for :meth:`Pipe.send_message`. A None
    entry in ``tensors`` is a ``None`` sent in a tensor's place.
    """

    seq: int
    tensors: list[Optional[TensorSpec]]
    body: Optional[bytes] = None

    @property
    def payloads(self) -> int:
        """How many payload messages follow this header (tensors with bytes that do not ride inline)."""
        return sum(1 for s in self.tensors if s is not None and not s.inline and s.nbytes)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Header)

_DTYPE_NAMES = [
    "float64", "float32", "float16", "bfloat16", "complex128", "complex64", "complex32",
    "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
]
DTYPES: dict[str, torch.dtype] = {n: getattr(torch, n) for n in _DTYPE_NAMES if isinstance(getattr(torch, n, None), torch.dtype)}
_DTYPE_TO_NAME = {d: n for n, d in DTYPES.items()}
_ITEMSIZE = {n: d.itemsize for n, d in DTYPES.items()}


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


def spec_of(t: torch.Tensor, inline: bool) -> TensorSpec:
    """The spec of a contiguous tensor ``t``."""
    return TensorSpec(dtype_name(t.dtype), list(t.shape), t.numel() * t.element_size(), t.device.type, inline)


def _int_size(v: int) -> int:
    if 0 <= v:
        return 1 if v < 128 else 2 if v < 1 << 8 else 3 if v < 1 << 16 else 5 if v < 1 << 32 else 9
    return 1 if v >= -32 else 2 if v >= -(1 << 7) else 3 if v >= -(1 << 15) else 5 if v >= -(1 << 31) else 9


def _len_size(n: int, small: int) -> int:
    """Bytes of a msgpack str/array length prefix (``small``: the fix-form limit, 32 or 16)."""
    return 1 if n < small else 3 if n < 1 << 16 else 5


def _spec_size(s: TensorSpec | None) -> int:
    if s is None:
        return 1
    dtype = len(s.dtype.encode())
    dtype += 2 if 32 <= dtype < 256 else _len_size(dtype, 32)
    device = len(s.device.encode())
    device += 2 if 32 <= device < 256 else _len_size(device, 32)
    shape = _len_size(len(s.shape), 16) + sum(_int_size(d) for d in s.shape)
    return 1 + dtype + shape + _int_size(s.nbytes) + device + 1


def header_size(header: Header) -> int:
    """``len(encode_header_bytes(header))``, computed from the specs' sizes without encoding (msgpack's rules)."""
    body = header.body
    n = 1 if body is None else len(body) + (2 if len(body) < 1 << 8 else 3 if len(body) < 1 << 16 else 5)
    return 1 + _int_size(header.seq) + _len_size(len(header.tensors), 16) + sum(map(_spec_size, header.tensors)) + n


def encode_header_bytes(header: Header) -> bytes:
    """``header`` as msgpack: what follows the frame's 4-byte length prefix."""
    return _encoder.encode(header)


def encode_header(frame: memoryview, header: Header, inline: Sequence[bytes | memoryview] = ()) -> int:
    """Write ``header`` and the ``inline`` payloads (in order) into ``frame``; return the bytes used."""
    body = _encoder.encode(header)
    end = _LEN.size + len(body)
    total = end + sum(len(b) for b in inline)
    if total > len(frame):
        raise LocalUsageError(f"send header of {total} bytes does not fit its {len(frame)}-byte frame "
                              f"({len(header.tensors)} tensors, body {len(header.body or b'')} bytes): "
                              "send fewer tensors or a smaller message at once")
    _LEN.pack_into(frame, 0, len(body))
    frame[_LEN.size:end] = body
    for b in inline:
        frame[end:end + len(b)] = b
        end += len(b)
    return total


def _spec_problem(s: TensorSpec, max_nbytes: int) -> str | None:
    itemsize = _ITEMSIZE.get(s.dtype)
    if itemsize is None:
        return f"names unknown dtype {clip(s.dtype, 40)!r}"
    shape = s.shape  # ints: the decoder refuses anything else (a bool, a float) for list[int]
    if len(shape) > MAX_NDIM or (shape and (min(shape) < 0 or max(shape) > max_nbytes)):
        return f"has an invalid shape {s.shape[:8]}"
    expect = math.prod(shape) * itemsize
    if s.nbytes != expect:
        return f"says {s.nbytes} bytes but dtype {s.dtype} and shape {s.shape} make {expect}"
    if s.nbytes > max_nbytes:
        return f"claims {s.nbytes} bytes, above this pipe's limit of {max_nbytes}"
    return None


def decode_header(frame: memoryview, peer: str, expected_seq: int, max_nbytes: int,
                  max_tensors: int | None = None) -> tuple[Header, list[memoryview | None]]:
    """Parse and validate a header frame from ``peer``; return it with each tensor's inline bytes (or None).

    Rejects (with :class:`RemoteProtocolError`) a body length past the frame,
    an undecodable body (any decoder exception), an out-of-order sequence
    number, more tensors than ``max_tensors``, and per tensor: an unknown
    dtype, a shape that is negative, too deep or has a dimension above
    ``max_nbytes`` (even beside a zero), an ``nbytes`` that disagrees with
    dtype and shape, a claim above ``max_nbytes``, and inline bytes that
    overrun the frame; nothing is allocated from an unchecked length.
    """
    if len(frame) < _LEN.size:
        raise RemoteProtocolError(f"truncated tensor header from {peer}")
    (n,) = _LEN.unpack_from(frame, 0)
    if n > len(frame) - _LEN.size:
        raise RemoteProtocolError(f"tensor header from {peer} claims {n} bytes, frame holds {len(frame) - _LEN.size}")
    try:
        h = _decoder.decode(frame[_LEN.size:_LEN.size + n])
    except Exception as exc:  # noqa: BLE001 - any decoder exception is the peer's malformed header
        raise RemoteProtocolError(f"malformed tensor header from {peer}: {clip(str(exc))}") from None
    if h.seq != expected_seq:
        raise RemoteProtocolError(f"out-of-order tensor from {peer}: got seq {h.seq}, expected {expected_seq}")
    if max_tensors is not None and len(h.tensors) > max_tensors:
        raise RemoteProtocolError(f"message from {peer} announces {len(h.tensors)} tensors, at most "
                                  f"{max_tensors} accepted")
    inline: list[memoryview | None] = []
    pos = _LEN.size + n
    for i, s in enumerate(h.tensors):
        if s is None:
            inline.append(None)
            continue
        bad = _spec_problem(s, max_nbytes)
        if bad:
            raise RemoteProtocolError(f"tensor header from {peer}: tensor {i} {bad}")
        if s.inline:
            if pos + s.nbytes > len(frame):
                raise RemoteProtocolError(f"inline tensor {i} from {peer} overruns its frame ({s.nbytes} bytes)")
            inline.append(frame[pos:pos + s.nbytes])
            pos += s.nbytes
        else:
            inline.append(None)
    return h, inline
