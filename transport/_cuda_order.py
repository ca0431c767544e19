"""Ordering UCX's access to CUDA memory after the work the caller queued on its CUDA stream.

UCX reads and writes device memory from streams of its own (cuda_ipc, cuda_copy) with no
ordering against the caller's: a kernel queued before ``send_tensor(t)`` may not have
written ``t`` when UCX reads it, and a kernel queued before a receive into ``t`` may still
be reading ``t`` when UCX overwrites it. Each transfer that touches CUDA memory therefore
first waits for the calling thread's current stream on that device (torch's convention:
work is ordered on the current stream), so the transfer sees memory as program order says.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch


def settle(devices: Iterable[Optional[torch.device]]) -> None:
    """Wait until the current stream of each CUDA device in ``devices`` has run what was queued on it.

    Host devices and None are ignored; each CUDA device is waited for once. Costs nothing
    without a CUDA device in the list.
    """
    seen: set[Optional[int]] = set()
    for dev in devices:
        if dev is None or dev.type != "cuda" or dev.index in seen:
            continue
        seen.add(dev.index)
        torch.cuda.current_stream(dev).synchronize()
