"""The transport's exceptions: one base, split by whose fault it is.

- :class:`LocalUsageError`: the caller misused the API (closed pipe, bad argument).
- :class:`RemoteProtocolError`: the peer sent something that breaks the protocol
  (garbage, wrong version, a header that lies about its payload).
- :class:`PeerError` and its children: the peer is gone, silent or refused us.

Every message names the peer (``host:port`` or its advertised name) and what was
expected, so an operator can tell which side to look at.
"""

from __future__ import annotations

__all__ = [
    "TransportError",
    "LocalUsageError",
    "RemoteProtocolError",
    "VersionMismatchError",
    "PeerError",
    "PeerTimeoutError",
    "PeerClosedError",
    "PeerDeadError",
    "PeerRejectedError",
]


class TransportError(Exception):
    """Base class of every error raised by ``transport``."""


class LocalUsageError(TransportError, ValueError):
    """The caller misused the API (our fault, not the peer's)."""


class RemoteProtocolError(TransportError):
    """The peer sent bytes that break the protocol (the peer's fault)."""


class VersionMismatchError(RemoteProtocolError):
    """The peer speaks another protocol version."""


class PeerError(TransportError):
    """The peer cannot be talked to: gone, silent, or it refused us."""


class PeerTimeoutError(PeerError, TimeoutError):
    """A wait on the peer ran past its timeout."""


class PeerClosedError(PeerError, EOFError):
    """The peer closed its end in an orderly way."""


class PeerDeadError(PeerError, ConnectionError):
    """The peer stopped answering (killed, frozen or unreachable)."""


class PeerRejectedError(PeerError):
    """The peer answered our handshake with a rejection."""
