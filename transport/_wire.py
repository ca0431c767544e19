"""Typed, versioned control-plane messages and their framing.

Every control message travels as two ZeroMQ frames: the 8-byte preamble of
:class:`transport._envelope.MessageCodec` (magic ``UKV`` + NUL, version u16,
reserved u16), then a msgpack body holding one tagged :class:`msgspec.Struct`.
The preamble is checked before the body is decoded, so a peer of another
version gets a :class:`VersionMismatchError` naming both versions instead of a
decode error.

Messages evolve only by appending fields with defaults; a change that breaks
that rule bumps :data:`PROTOCOL_VERSION`.
"""

from __future__ import annotations

from typing import Union

import msgspec

from ._envelope import PREAMBLE_SIZE, MessageCodec, clip
from .errors import RemoteProtocolError

# Version history:
#   1: first release (Hello/Welcome/Reject/Heartbeat/Goodbye, a TensorHeader per tensor sent).
#      Compatible additions (no bump: appended fields with defaults, and a message
#      only sent to a dialler that asked for it): Hello.auth_nonce/auth_proof,
#      Welcome.auth_proof, Challenge (shared-secret authentication, see .auth).
#   2: the data plane's send header became the envelope of transport._envelope (one header
#      describing every tensor of a send, then the payloads); control message bytes unchanged.
PROTOCOL_VERSION = 2
MAGIC = b"UKV\x00"
#: Largest control-message body accepted; anything longer is rejected unread.
MAX_CONTROL_BODY = 64 * 1024


class Hello(msgspec.Struct, tag=True, frozen=True):
    """Sent by the connecting side: who it is and how to reach its UCX worker."""

    role: str
    name: str
    worker_address: bytes
    #: Tag base the sender of Hello receives on (the listener sends with it).
    recv_tag: int
    capabilities: list[str] = []
    service: str = "pipe"
    meta: dict[str, str] = {}
    #: Shared-secret auth: the dialler's fresh nonce (empty: no auth asked for).
    auth_nonce: bytes = b""
    #: Shared-secret auth: proof over both nonces and this Hello (empty in the first Hello).
    auth_proof: bytes = b""


class Welcome(msgspec.Struct, tag=True, frozen=True):
    """The listener's answer to an accepted Hello."""

    role: str
    name: str
    worker_address: bytes
    recv_tag: int
    capabilities: list[str] = []
    meta: dict[str, str] = {}
    #: Shared-secret auth: the listener's proof over both nonces and this Welcome.
    auth_proof: bytes = b""


class Challenge(msgspec.Struct, tag=True, frozen=True):
    """Shared-secret auth: the listener's nonce and its proof that it knows the secret."""

    nonce: bytes
    proof: bytes


class Reject(msgspec.Struct, tag=True, frozen=True):
    """The listener refuses a message; ``reason`` says why in plain words."""

    code: str
    reason: str


class Heartbeat(msgspec.Struct, tag=True, frozen=True):
    """Liveness beacon, sent periodically by both ends of a link."""

    seq: int = 0


class Goodbye(msgspec.Struct, tag=True, frozen=True):
    """Orderly close: the sender will send nothing more."""

    reason: str = ""
    #: How many messages the sender sent on the data plane before this Goodbye
    #: (-1: unknown). Data can arrive after the Goodbye; the peer drains up to it.
    sent: int = -1


ControlMessage = Union[Hello, Welcome, Reject, Heartbeat, Goodbye, Challenge]

CODEC = MessageCodec(MAGIC, PROTOCOL_VERSION, ControlMessage, what="control message", max_body=MAX_CONTROL_BODY)
_PREAMBLE_BYTES = CODEC.preamble


def encode(msg: ControlMessage) -> list[bytes]:
    """Return the frames for ``msg``: preamble, then body."""
    return [_PREAMBLE_BYTES, CODEC.encode_body(msg)]


def decode(frames: list[bytes], peer: str) -> ControlMessage:
    """Decode frames received from ``peer``.

    Raises :class:`VersionMismatchError` for another protocol version and
    :class:`RemoteProtocolError` for anything else malformed (any exception the
    decoder raises, ``RecursionError`` from deep nesting included); never
    allocates more than the frames already hold.
    """
    if len(frames) != 2:
        raise RemoteProtocolError(
            f"malformed control message from {peer}: expected 2 frames (preamble, body), got {len(frames)}"
        )
    pre, body = frames
    if len(pre) != PREAMBLE_SIZE:
        raise RemoteProtocolError(
            f"malformed control message from {peer}: preamble is {len(pre)} bytes, expected {PREAMBLE_SIZE}"
        )
    CODEC.check_preamble(pre, peer)
    return CODEC.decode_body(body, peer)


__all__ = ["Hello", "Welcome", "Challenge", "Reject", "Heartbeat", "Goodbye", "ControlMessage", "PROTOCOL_VERSION",
           "MAGIC", "PREAMBLE_SIZE", "MAX_CONTROL_BODY", "CODEC", "encode", "decode", "clip"]
