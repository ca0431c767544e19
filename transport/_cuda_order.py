"""Ordering UCX's access to CUDA memory after the work the caller queued on its CUDA stream.

UCX reads and writes device memory from streams of its own (cuda_ipc, cuda_copy) with no
ordering against the caller's: a kernel queued before ``send_tensor(t)`` may not have
written ``t`` when UCX reads it, and a kernel queued before a receive into ``t`` may still
be reading ``t`` when UCX overwrites it. Each transfer that touches CUDA memory therefore
first waits for the calling thread's current stream on that device (torch's convention:
work is ordered on the current stream), so the transfer sees memory as program order says.
"""

from __future__ import annotations

from typing import Iterable, Iterator, List, Optional, Tuple

import torch

#: What :func:`record` returns: per CUDA device, an event recorded on its current stream.
Recorded = Optional[List[Tuple[torch.device, "torch.cuda.Event"]]]


def _each_cuda(devices: Iterable[Optional[torch.device]]) -> Iterator[torch.device]:
    """The CUDA devices of ``devices``, each once (host devices and None left out)."""
    seen: set[Optional[int]] = set()
    for dev in devices:
        if dev is not None and dev.type == "cuda" and dev.index not in seen:
            seen.add(dev.index)
            yield dev


def settle(devices: Iterable[Optional[torch.device]]) -> None:
    """Wait until the current stream of each CUDA device in ``devices`` has run what was queued on it.

    Host devices and None are ignored; each CUDA device is waited for once. Costs nothing
    without a CUDA device in the list.
    """
    for dev in _each_cuda(devices):
        torch.cuda.current_stream(dev).synchronize()


def record(devices: Iterable[Optional[torch.device]]) -> Recorded:
    """An event recorded on the current stream of each CUDA device in ``devices`` (each once), or None
    when there is none. Unlike :func:`settle` it does not wait: :func:`wait` or :func:`order_after`
    later orders what reads the memory after what was queued on those streams before this call."""
    out: List[Tuple[torch.device, torch.cuda.Event]] = []
    for dev in _each_cuda(devices):
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(dev))
        out.append((dev, ev))
    return out or None


def wait(recorded: Recorded) -> None:
    """Block this thread until every event of :func:`record` has run (None: at once)."""
    for _, ev in recorded or ():
        ev.synchronize()


def order_after(recorded: Recorded) -> None:
    """Make this thread's current stream of each device of :func:`record` wait, on the GPU, for its
    event: work queued on it from now on runs after what was recorded (None: nothing to do)."""
    for dev, ev in recorded or ():
        ev.wait(torch.cuda.current_stream(dev))
