"""Typed, versioned messages of the lookup-buffer protocol and their framing.

A lookup request or answer is one small ``uint8`` tensor followed by a number of
ordinary tensors on the same :class:`transport.Pipe` (each direction of a pipe
is an ordered FIFO, so they arrive in order). The message tensor holds a fixed
12-byte preamble and a msgpack body::

    magic "LKB\\0" | version u16 | reserved u16 | n_tensors u32 | msgpack(Struct)

``n_tensors`` sits in the preamble so a receiver can drain the tensors that
follow even when it cannot decode the body (it answers with an error and the
pipe stays in step). The version is checked before the body is decoded, so a
peer of another version gets :class:`WireVersionError` naming both versions.

Messages evolve only by appending fields with defaults; anything else bumps
:data:`WIRE_VERSION`.
"""

from __future__ import annotations

import struct
from typing import Any, List, Optional, Sequence, Tuple, Union

import msgspec
import numpy as np
import torch

from .errors import KVUsageError, LookupProtocolError, WireVersionError

# Version history:
#   1: first release (Fetch/Stats/Abort; Found/NotFound/StatsReply/AbortReply/ErrorReply).
WIRE_VERSION = 1
MAGIC = b"LKB\x00"
_PREAMBLE = struct.Struct("<4sHHI")
PREAMBLE_SIZE = _PREAMBLE.size
#: Largest message body accepted; anything longer is refused unread.
MAX_BODY = 64 * 1024
#: Most tensors one message may announce (a guard against a lying preamble).
MAX_TENSORS = 1 << 16

# Encoding of one entry part (key, value or hidden) in ``Found.parts``.
PART_NONE = -1
PART_TENSOR = -2  # a single tensor; n >= 0 means a list of n tensors


# -- requests (consumer -> producer) -------------------------------------------
class Fetch(msgspec.Struct, tag=True, frozen=True):
    """drop_select: followed by 2 tensors, the query tokens and roi (either may be None).

    ``narrow`` (``[dim, start, length]``) asks for every key tensor cut to that
    range of one dim (a KV-head range under tensor parallelism); ``readers``
    is how many fetches consume the entry (the first claim sets it, see
    :meth:`LookupBuffer.claim`). Both were appended with defaults (version 1
    peers that omit them get the whole entry, consumed by one fetch).
    """

    seq: int
    request_id: Optional[str] = None
    prefix: bool = False
    min_prefix: int = 1
    wait_s: float = 0.0
    narrow: Optional[List[int]] = None
    readers: int = 1


class Stats(msgspec.Struct, tag=True, frozen=True):
    """Ask for the buffer's occupancy."""

    seq: int


class Abort(msgspec.Struct, tag=True, frozen=True):
    """Drop every unclaimed entry stored under ``request_id``."""

    seq: int
    request_id: str


# -- answers (producer -> consumer) --------------------------------------------
class Found(msgspec.Struct, tag=True, frozen=True):
    """A match: followed by tokens, roi, then the tensors of key, value, hidden per ``parts``."""

    seq: int
    matched: int
    parts: List[int]
    request_id: Optional[str] = None


class NotFound(msgspec.Struct, tag=True, frozen=True):
    """No entry matched within the wait the request allowed."""

    seq: int


class StatsReply(msgspec.Struct, tag=True, frozen=True):
    seq: int
    bytes_used: int
    num_entries: int
    capacity_bytes: int


class AbortReply(msgspec.Struct, tag=True, frozen=True):
    seq: int
    dropped: int


class ErrorReply(msgspec.Struct, tag=True, frozen=True):
    """The producer could not serve the request; ``code`` is machine-readable."""

    seq: int
    code: str
    message: str


Request = Union[Fetch, Stats, Abort]

#: How many tensors each request carries; a server receives no more than its request type needs.
REQUEST_TENSORS = {Fetch: 2, Stats: 0, Abort: 0}
MAX_REQUEST_TENSORS = max(REQUEST_TENSORS.values())
#: Largest tensor a request may carry (query tokens or roi: 64 MiB is 8M int64 tokens).
MAX_REQUEST_TENSOR_BYTES = 64 << 20
Response = Union[Found, NotFound, StatsReply, AbortReply, ErrorReply]

_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_response_decoder = msgspec.msgpack.Decoder(Response)


def encode(msg: Any, n_tensors: int = 0) -> torch.Tensor:
    """Frame ``msg`` as a uint8 tensor announcing ``n_tensors`` tensors to follow."""
    body = _encoder.encode(msg)
    if len(body) > MAX_BODY:
        raise LookupProtocolError(f"lookup message body of {len(body)} bytes exceeds {MAX_BODY}")
    buf = bytearray(PREAMBLE_SIZE + len(body))
    _PREAMBLE.pack_into(buf, 0, MAGIC, WIRE_VERSION, 0, int(n_tensors))
    buf[PREAMBLE_SIZE:] = body
    return torch.frombuffer(buf, dtype=torch.uint8)


def read_preamble(frame: Any, peer: str) -> Tuple[int, int]:
    """Check a message tensor's preamble; return ``(version, n_tensors)``.

    Raises :class:`LookupProtocolError` (not a lookup message) naming ``peer``.
    A version mismatch is *not* raised here, so the caller can still drain the
    announced tensors; :func:`decode` raises it.
    """
    if not isinstance(frame, torch.Tensor) or frame.dtype != torch.uint8 or frame.dim() != 1:
        what = "None" if frame is None else f"{getattr(frame, 'dtype', type(frame).__name__)} {tuple(getattr(frame, 'shape', ()))}"
        raise LookupProtocolError(f"expected a 1-D uint8 lookup message from {peer}, got {what}")
    if frame.numel() < PREAMBLE_SIZE:
        raise LookupProtocolError(f"lookup message from {peer} is {frame.numel()} bytes, shorter than the preamble")
    magic, version, _, n = _PREAMBLE.unpack_from(frame[:PREAMBLE_SIZE].numpy().tobytes())
    if magic != MAGIC:
        raise LookupProtocolError(f"message from {peer} does not start with the lookup magic {MAGIC!r} (got {magic!r})")
    if n > MAX_TENSORS:
        raise LookupProtocolError(f"lookup message from {peer} announces {n} tensors (at most {MAX_TENSORS})")
    return version, n


def _decode(frame: torch.Tensor, peer: str, decoder: Any, what: str) -> Tuple[Any, int]:
    version, n = read_preamble(frame, peer)
    if version != WIRE_VERSION:
        raise WireVersionError(
            f"{peer} speaks lookup protocol version {version}, this side speaks {WIRE_VERSION}; "
            f"upgrade the older of the two"
        )
    body = frame[PREAMBLE_SIZE:]
    if body.numel() > MAX_BODY:
        raise LookupProtocolError(f"lookup {what} from {peer}: body of {body.numel()} bytes exceeds {MAX_BODY}")
    try:
        return decoder.decode(body.numpy().tobytes()), n
    except RecursionError:
        # msgspec raises this for deeply nested msgpack (even in an ignored field);
        # a body fits in MAX_BODY bytes, so it is only ever a malformed message
        raise LookupProtocolError(f"undecodable lookup {what} from {peer}: nested too deeply") from None
    except Exception as exc:  # noqa: BLE001 - DecodeError, ValidationError, anything else: the peer's fault
        text = str(exc)
        text = text if len(text) <= 200 else f"{text[:200]}... ({len(text)} chars)"
        raise LookupProtocolError(f"undecodable lookup {what} from {peer}: {text}") from None


def decode_request(frame: torch.Tensor, peer: str) -> Tuple[Request, int]:
    """Decode a request tensor; returns ``(message, n_tensors_following)``.

    Raises :class:`LookupProtocolError` when the preamble announces another
    number of tensors than the request's type carries (:data:`REQUEST_TENSORS`).
    """
    msg, n = _decode(frame, peer, _request_decoder, "request")
    want = REQUEST_TENSORS[type(msg)]
    if n != want:
        raise LookupProtocolError(f"lookup {type(msg).__name__} from {peer} announces {n} tensors; it carries {want}")
    return msg, n


def decode_response(frame: torch.Tensor, peer: str) -> Tuple[Response, int]:
    """Decode an answer tensor; returns ``(message, n_tensors_following)``."""
    return _decode(frame, peer, _response_decoder, "answer")


# -- entry parts ---------------------------------------------------------------
Part = Union[None, torch.Tensor, List[torch.Tensor]]


def flatten_parts(parts: Sequence[Part]) -> Tuple[List[int], List[torch.Tensor]]:
    """Codes and the flat tensor list for ``parts`` (each None, a tensor or a list of tensors)."""
    codes: List[int] = []
    flat: List[torch.Tensor] = []
    for p in parts:
        if p is None:
            codes.append(PART_NONE)
        elif isinstance(p, torch.Tensor):
            codes.append(PART_TENSOR)
            flat.append(p)
        else:
            codes.append(len(p))
            flat.extend(p)
    return codes, flat


def unflatten_parts(codes: Sequence[int], flat: Sequence[Any], peer: str) -> List[Part]:
    """Inverse of :func:`flatten_parts`; checks the counts add up."""
    out: List[Part] = []
    i = 0
    for c in codes:
        if c == PART_NONE:
            out.append(None)
        elif c == PART_TENSOR:
            out.append(flat[i] if i < len(flat) else None)
            i += 1
        elif c >= 0:
            out.append(list(flat[i : i + c]))
            i += c
        else:
            raise LookupProtocolError(f"answer from {peer} has an unknown part code {c}")
    if i != len(flat):
        raise LookupProtocolError(f"answer from {peer}: parts {list(codes)} describe {i} tensors, {len(flat)} arrived")
    return out


def count_parts(codes: Sequence[int]) -> int:
    """How many tensors the part ``codes`` describe."""
    return sum(1 if c == PART_TENSOR else (c if c >= 0 else 0) for c in codes)


def tokens_key(tokens: Optional[torch.Tensor], roi: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    """The masked tokens as a 1-D int64 numpy array (``tokens[roi]``), or None without tokens."""
    if tokens is None:
        return None
    t = tokens.detach().reshape(-1).to("cpu")
    if roi is not None:
        r = roi.detach().reshape(-1).to("cpu")
        if r.dtype != torch.bool:
            r = r != 0
        if r.numel() != t.numel():
            raise KVUsageError(f"roi has {r.numel()} elements but input_tokens has {t.numel()}")
        t = t[r]
    return t.to(torch.int64).numpy()
