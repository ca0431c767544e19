"""The kv_transfer layer's exceptions: one base, split by whose fault it is.

- :class:`KVUsageError`: the caller misused the API (bad argument, closed object,
  an entry larger than the whole buffer).
- :class:`BufferFullError`: back-pressure; the buffer stayed full for the whole
  timeout an ``insert`` was given.
- :class:`LookupProtocolError` (and :class:`WireVersionError`): the peer sent a
  lookup message this side cannot accept.
- :class:`ProducerError`: the remote producer answered a request with an error.
- :class:`PeerUnavailableError`: the pipe to the peer broke (dead, closed,
  silent); the transport's own error is kept as ``__cause__``.

Messages name the peer (its address) and what was expected.
"""

from __future__ import annotations

__all__ = [
    "KVTransferError",
    "KVUsageError",
    "EntryTooLargeError",
    "BufferFullError",
    "LookupProtocolError",
    "WireVersionError",
    "ProducerError",
    "PeerUnavailableError",
]


class KVTransferError(Exception):
    """Base class of every error raised by ``kv_transfer``."""


class KVUsageError(KVTransferError, ValueError):
    """The caller misused the API (our fault, not the peer's)."""


class EntryTooLargeError(KVUsageError):
    """An entry bigger than the buffer's whole capacity: it could never fit."""


class BufferFullError(KVTransferError, TimeoutError):
    """``insert`` waited its whole timeout and the buffer never had room (back-pressure)."""


class LookupProtocolError(KVTransferError):
    """The peer sent a lookup message that breaks the protocol (the peer's fault)."""


class WireVersionError(LookupProtocolError):
    """The peer speaks another version of the lookup protocol."""


class ProducerError(KVTransferError):
    """The remote producer refused or failed a request and said why."""


class PeerUnavailableError(KVTransferError, ConnectionError):
    """The pipe to the peer is unusable (dead, closed, timed out); see ``__cause__``."""
