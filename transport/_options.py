"""PipeOptions: the one frozen object of a pipe's waiting, liveness, landing-device and trust parameters.

Built once by whoever makes pipes (an application, the lookup server or
client, the bench) and passed down unchanged through :meth:`Pipe.listen`,
:meth:`Pipe.connect`, :class:`PipeListener` and the control plane, so a
default lives in one place. The documented keywords of those entry points
(``timeout_s=``, ``device=``, ...) stay as conveniences that build it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypedDict

import torch

from .auth import Auth
from .errors import LocalUsageError

__all__ = ["PipeOptions", "PipeKeywords", "HEARTBEAT_S", "PEER_TIMEOUT_S", "DEFAULT_TIMEOUT_S", "DEFAULT_MAX_TENSOR_BYTES"]

#: Seconds between liveness beacons on a control link.
HEARTBEAT_S = 1.0
#: Seconds of silence after which a peer counts as dead.
PEER_TIMEOUT_S = 10.0
#: Default bound on one blocking pipe call (connect, send, receive).
DEFAULT_TIMEOUT_S = 60.0
#: Default cap on one received tensor's claimed size.
DEFAULT_MAX_TENSOR_BYTES = 64 << 30


@dataclass(frozen=True)
class PipeOptions:
    """How a pipe waits, watches its peer, where received tensors land and whom it trusts.

    Attributes:
        timeout_s: Bound on one blocking call (connect, send, receive) unless the call gives its own.
        heartbeat_s: Seconds between liveness beacons.
        peer_timeout_s: Silence after which the peer counts as dead (must exceed ``heartbeat_s``).
        device: Where received tensors land unless a receive names another (``"cpu"``, ``"cuda:0"``).
        max_tensor_bytes: Largest tensor a peer may announce; a larger claim is refused unallocated.
        auth: Who may connect / how we prove who we are (None reads ``UCXKV_AUTH``).
    """

    timeout_s: float = DEFAULT_TIMEOUT_S
    heartbeat_s: float = HEARTBEAT_S
    peer_timeout_s: float = PEER_TIMEOUT_S
    device: str | torch.device = "cpu"
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES
    auth: Auth | None = None

    def __post_init__(self) -> None:
        for f in ("timeout_s", "heartbeat_s", "peer_timeout_s"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or not v > 0:
                raise LocalUsageError(f"PipeOptions.{f} must be a positive number of seconds, got {v!r}")
        if self.heartbeat_s >= self.peer_timeout_s:
            raise LocalUsageError(f"PipeOptions.heartbeat_s ({self.heartbeat_s}) must be below peer_timeout_s "
                                  f"({self.peer_timeout_s}), or a live peer would count as dead")
        if not isinstance(self.max_tensor_bytes, int) or self.max_tensor_bytes <= 0:
            raise LocalUsageError(f"PipeOptions.max_tensor_bytes must be a positive int, got {self.max_tensor_bytes!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise LocalUsageError(f"PipeOptions.device {self.device!r} is not a device: {exc}") from None
        if self.auth is not None and not isinstance(self.auth, Auth):
            raise LocalUsageError(f"PipeOptions.auth must be a transport.auth.Auth or None, got {type(self.auth).__name__}")

    def replace(self, **changes: Any) -> "PipeOptions":
        """A copy with ``changes`` applied; a change of None keeps this object's value (a keyword not given)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown pipe option(s) {unknown}; PipeOptions has "
                            f"{[f.name for f in dataclasses.fields(self)]}")
        given = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **given) if given else self

    @classmethod
    def of(cls, options: "PipeOptions | None", **changes: Any) -> "PipeOptions":
        """``options`` (or the defaults) with the keywords a caller gave (None: not given) applied."""
        return (options if options is not None else cls()).replace(**changes)


class PipeKeywords(TypedDict, total=False):
    """The :class:`PipeOptions` fields an entry point also takes as keywords (each overrides ``options``)."""

    timeout_s: float
    heartbeat_s: float
    peer_timeout_s: float
    device: "str | torch.device"
    max_tensor_bytes: int
    auth: "Auth | None"
