"""An eventfd that one thread sleeps on, beside the other fds of its poll set, and any thread sets.

Used by the control threads (woken for a Goodbye or a close instead of polling every 100 ms) and
by the engine's sleepers (a waiter kicked when another thread's progress completed its operation).
"""

from __future__ import annotations

import os
import threading

__all__ = ["Wakeup"]


class Wakeup:
    """An eventfd, owned by the object of the thread that polls it; closed with :meth:`close`.

    :meth:`set` may come from any thread at any time: it takes a lock so that it never writes to
    a closed fd number (the kernel may have handed it to something else since), and does nothing
    once closed.
    """

    __slots__ = ("fd", "_lock")

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()

    def set(self) -> None:
        """Make the fd readable, waking its poller (from any thread; nothing once closed)."""
        with self._lock:
            if self.fd >= 0:
                os.eventfd_write(self.fd, 1)

    def clear(self) -> None:
        """Consume what :meth:`set` wrote (by the polling thread, after it woke)."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass

    def close(self) -> None:
        """Close the fd (idempotent)."""
        with self._lock:
            if self.fd >= 0:
                fd, self.fd = self.fd, -1
                os.close(fd)
