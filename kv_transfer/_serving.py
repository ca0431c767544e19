"""What every KV service of this package does with its pipes: their default options, accept peers, one thread each."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, List

from transport import PeerTimeoutError, Pipe, PipeListener, PipeOptions

log = logging.getLogger(__name__)

#: The pipe options every KV service and client of this package starts from: transport's defaults, but one
#: exchange is bounded by 30 s (a lookup answer or a kvrma round; a stuck producer must not hold decode for a minute).
KV_PIPE_OPTIONS = PipeOptions(timeout_s=30.0)


def accept_loop(listener: PipeListener, stop: threading.Event, lock: Any, pipes: List[Pipe],
                threads: List[threading.Thread], serve: Callable[[Pipe], None], prefix: str) -> None:
    """Until ``stop`` is set or the listener closes: accept each peer, record its pipe in ``pipes`` and its
    handler thread (running ``serve(pipe)``, named ``prefix-peer``) in ``threads``, both under ``lock``."""
    while not stop.is_set():
        try:
            pipe = listener.accept(timeout=0.2)
        except PeerTimeoutError:
            continue
        except Exception:  # noqa: BLE001 - the listener closed under us
            if not stop.is_set():
                log.exception("%s on %s: accept failed", prefix, listener.address)
            break
        with lock:
            if stop.is_set():
                pipe.close()
                break
            pipes.append(pipe)
            t = threading.Thread(target=serve, args=(pipe,), daemon=True, name=f"{prefix}-{pipe.peer}")
            # forget finished handlers: a long-lived server sees many short-lived consumers
            threads[:] = [x for x in threads if x.is_alive()]
            threads.append(t)
        t.start()
        # this frame must not hold the last peer's pipe (and through an error's traceback, the
        # buffers, endpoint and fds of a consumer long gone) until the next peer connects
        del pipe, t


def stop_serving(listener: PipeListener, stop: threading.Event, lock: Any, pipes: List[Pipe],
                 threads: List[threading.Thread], timeout: float) -> bool:
    """Set ``stop``, close the listener and every peer's pipe (interrupting the handlers' waits), join the
    threads within ``timeout`` seconds in all. False when it was already stopped (close is idempotent)."""
    if stop.is_set():
        return False
    stop.set()
    listener.close()
    with lock:
        closing = list(pipes)
        pipes.clear()
    for p in closing:
        p.close()
    end = time.monotonic() + timeout
    for t in list(threads):
        if t is not threading.current_thread():
            t.join(max(0.0, end - time.monotonic()))
    return True
