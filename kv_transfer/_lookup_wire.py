"""Typed, versioned messages of the lookup-buffer protocol, framed by transport's one envelope.

A lookup request or answer is one :meth:`transport.Pipe.send_message`
envelope: a single header describing every tensor that follows (dtype,
shape, byte count, device) and carrying the message body, then the payloads.
The body is a :class:`transport.MessageCodec` message: an 8-byte preamble
(magic ``LKB\\0``, version u16, reserved u16), then one msgpack tagged
struct. The version is checked before the body is decoded, so a peer of
another version gets :class:`WireVersionError` naming both versions; any
exception from decoding hostile bytes becomes :class:`LookupProtocolError`.

The envelope's header states the tensor count, so a receiver stays in step
even when it cannot decode the body (it answers with an error), and a server
refuses an envelope announcing more tensors than any request carries
(:data:`MAX_REQUEST_TENSORS`) before receiving any of them.

Messages evolve only by appending fields with defaults; anything else bumps
:data:`WIRE_VERSION`.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import msgspec
import numpy as np
import torch

from transport import MessageCodec

from .errors import KVUsageError, LookupProtocolError, WireVersionError

# Version history:
#   1: first release (Fetch/Stats/Abort; Found/NotFound/StatsReply/AbortReply/ErrorReply), a uint8
#      message tensor (preamble with a tensor count) then each tensor with a header of its own.
#   2: the message and its tensors travel as one transport envelope (one header for all tensors);
#      the preamble lost its tensor count (the envelope header states it).
#   3: Found.echo: the entry's tokens are the query's own, so the answer carries None in their place
#      (a v2 client would take that None for the tokens: hence a new version, not an appended field).
WIRE_VERSION = 3
MAGIC = b"LKB\x00"
#: Largest message body accepted; anything longer is refused unread.
MAX_BODY = 64 * 1024

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
    """A match: followed by tokens, roi, then the tensors of key, value, hidden per ``parts``.

    ``echo``: the entry's tokens are the query's own (an exact match, neither side with a roi,
    the same dtype and shape, so the same values); None travels in their place and the client
    answers with the tokens it sent (:meth:`LookupClient.fetch`). A lookup's answer then carries
    one tensor fewer, which is ~4 µs of its round trip (docs/bench.md).
    """

    seq: int
    matched: int
    parts: List[int]
    request_id: Optional[str] = None
    echo: bool = False


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

_REQUESTS = MessageCodec(MAGIC, WIRE_VERSION, Request, what="lookup request", max_body=MAX_BODY,
                         error=LookupProtocolError, version_error=WireVersionError)
_RESPONSES = MessageCodec(MAGIC, WIRE_VERSION, Response, what="lookup answer", max_body=MAX_BODY,
                          error=LookupProtocolError, version_error=WireVersionError)
PREAMBLE_SIZE = len(_REQUESTS.preamble)


def encode(msg: Any) -> bytes:
    """The body of a lookup envelope for ``msg`` (a request or an answer)."""
    try:
        return _REQUESTS.encode(msg)
    except Exception as exc:  # noqa: BLE001 - too large: our own message, the caller's problem
        raise LookupProtocolError(f"cannot encode lookup {type(msg).__name__}: {exc}") from None


def decode_request(body: bytes, n_tensors: int, peer: str) -> Request:
    """Decode a request body that arrived with ``n_tensors`` tensors.

    Raises :class:`WireVersionError` for another version, and
    :class:`LookupProtocolError` for undecodable bytes or another number of
    tensors than the request's type carries (:data:`REQUEST_TENSORS`).
    """
    msg = _REQUESTS.decode(body, peer)
    want = REQUEST_TENSORS[type(msg)]
    if n_tensors != want:
        raise LookupProtocolError(f"lookup {type(msg).__name__} from {peer} announces {n_tensors} tensors; "
                                  f"it carries {want}")
    return msg


def decode_response(body: bytes, peer: str) -> Response:
    """Decode an answer body; raises :class:`WireVersionError` or :class:`LookupProtocolError`."""
    return _RESPONSES.decode(body, peer)


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
    if roi is None and tokens.dtype == torch.int64 and tokens.is_cpu and not tokens.requires_grad:
        return tokens.numpy().reshape(-1)  # the common query, once per lookup: ~0.8 µs, the steps below ~2.3
    t = tokens.detach().reshape(-1)
    if t.device.type != "cpu":  # (a .to("cpu") of a host tensor still costs a few us per lookup)
        t = t.cpu()
    if roi is not None:
        r = roi.detach().reshape(-1).cpu()
        if r.dtype != torch.bool:
            r = r != 0
        if r.numel() != t.numel():
            raise KVUsageError(f"roi has {r.numel()} elements but input_tokens has {t.numel()}")
        t = t[r]
    return (t if t.dtype == torch.int64 else t.to(torch.int64)).numpy()
