"""PipeListener: accepts any number of peers on one ``host:port``, each becoming its own :class:`Pipe`."""

from __future__ import annotations

import logging
import os
import queue
import socket

from typing_extensions import Unpack

from ._control import ControlServer, Link
from ._options import PipeKeywords, PipeOptions
from ._wire import Hello, Reject, Welcome
from .errors import PeerTimeoutError
from .pipe import Pipe, _capabilities, _hello_problem

log = logging.getLogger(__name__)

__all__ = ["PipeListener"]


class PipeListener:
    """Accepts any number of peers on one ``host:port``; each becomes its own :class:`Pipe`.

    ``accept()`` hands out connected pipes in arrival order. Closing the listener
    stops accepting; pipes already handed out stay usable until closed.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        name: str | None = None,
        service: str = "pipe",
        options: PipeOptions | None = None,
        max_pending: int = 64,
        **keywords: Unpack[PipeKeywords],
    ):
        """Listen on ``host:port``; every accepted pipe gets ``options`` (the keywords, when given, override it)."""
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.service = service
        self.options = PipeOptions.of(options, **keywords)
        self._accepted: "queue.Queue[Pipe]" = queue.Queue(max_pending)
        self._closed = False
        self._server = ControlServer(host, port, self._on_hello, options=self.options, name=service)
        self.address = self._server.address
        log.info("%s listener %s on %s", service, self.name, self.address)

    def _on_hello(self, hello: Hello, link: Link) -> Welcome | Reject:
        if self._closed:
            return Reject("closed", f"listener {self.name} is closing")
        bad = _hello_problem(hello, self.service)
        if bad is not None:
            return bad
        if self._accepted.full():
            return Reject("busy", f"listener {self.name} has too many unaccepted peers")
        pipe = Pipe(name=self.name, options=self.options)
        pipe._server, pipe._owns_server = self._server, False
        pipe.address = self.address
        pipe._attach(link, hello.worker_address, hello.recv_tag)
        self._accepted.put_nowait(pipe)
        return Welcome(role=self.service, name=self.name, worker_address=pipe._engine.address,
                       recv_tag=pipe._recv_tag, capabilities=_capabilities())

    def accept(self, timeout: float | None = None) -> Pipe:
        """The next connected peer's pipe; raises :class:`PeerTimeoutError` after ``timeout`` seconds."""
        try:
            return self._accepted.get(timeout=timeout)
        except queue.Empty:
            raise PeerTimeoutError(f"no peer connected to {self.address} within {timeout}s") from None

    @property
    def rejected(self) -> int:
        """How many handshakes or messages this listener refused."""
        return self._server.rejected

    def close(self) -> None:
        """Stop accepting and close the control socket (idempotent)."""
        if not self._closed:
            self._closed = True
            self._server.close()

    def __enter__(self) -> "PipeListener":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
