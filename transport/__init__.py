"""ucxkv's bottom layer: a ZeroMQ control plane, a UCX data plane, and the Pipe.

Knows nothing of KV caches. Public surface: :class:`Pipe`, :class:`PipeListener`, :class:`PipeOptions` (the one
frozen object of a pipe's parameters), :class:`Handle`, the envelope
(:class:`MessageCodec` for a typed, versioned message; :meth:`Pipe.send_message` / :meth:`Pipe.recv_message` carry
one with N tensors under one header), one-sided RMA
(:func:`register`, :class:`Registration`, :class:`MemoryDescriptor`, :class:`RemoteMemory`) and
the errors in :mod:`transport.errors`.
"""

from .errors import (
    LocalUsageError,
    PeerClosedError,
    PeerDeadError,
    PeerError,
    PeerRejectedError,
    PeerTimeoutError,
    RemoteProtocolError,
    TransportError,
    VersionMismatchError,
)
from ._envelope import MessageCodec, TensorSpec
from ._rma import MemoryDescriptor, Registration, RemoteMemory, StaleMemoryError, register, transfer_many
from ._options import PipeOptions
from ._listener import PipeListener
from .pipe import Handle, Pipe


def warm_up() -> None:
    """Create this process's UCX context and worker now (about 0.5 s), not on the first transfer."""
    from ._engine import get_engine

    get_engine()


__all__ = [
    "Pipe",
    "PipeListener",
    "PipeOptions",
    "warm_up",
    "Handle",
    "MessageCodec",
    "TensorSpec",
    "register",
    "transfer_many",
    "Registration",
    "MemoryDescriptor",
    "RemoteMemory",
    "StaleMemoryError",
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
