"""Process bodies for tests/test_vllm_rma.py: a reader killed mid-read or after its read, a producer killed mid-read."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import torch

BS = 4


def caches(seed: int, num_blocks: int = 8, heads: int = 2, width: int = 16) -> list[torch.Tensor]:
    """Two vLLM-CPU-layout layer caches filled from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(num_blocks, heads, BS, width, generator=g) for _ in range(2)]


def reader_killed_after_claim(q: Any, address: str, request_id: str, tokens: list[int]) -> None:
    """Claims ``request_id`` at ``address`` (the lease now bound to this pipe), reports, then SIGKILLs itself."""
    from kv_transfer.paged import PagedLayout
    from kv_transfer.rma_kv import Claim, Claimed, RmaKVClient, tokens_digest
    from transport import register

    dst = caches(2)
    c = RmaKVClient(address, dst, [register(t) for t in dst], PagedLayout.vllm_cpu(), timeout_s=10)
    c._connect()
    rep = c._rpc(Claim(1, request_id, tokens_digest(tokens), len(tokens)))
    q.put(("claimed", isinstance(rep, Claimed)))
    q.close()
    q.join_thread()
    os.kill(os.getpid(), signal.SIGKILL)


def reader_killed_after_read(q: Any, address: str, request_id: str, tokens: list[int], blocks: list[int]) -> None:
    """Loads ``request_id`` (Claim, GETs, Done) into ``blocks``, reports what it read, then SIGKILLs itself
    (a decode that died mid-answer: it never acknowledges)."""
    from kv_transfer.paged import PagedLayout
    from kv_transfer.rma_kv import RmaKVClient
    from transport import register

    dst = caches(2)
    c = RmaKVClient(address, dst, [register(t) for t in dst], PagedLayout.vllm_cpu(), timeout_s=10)
    res = c.load(request_id, tokens, blocks)
    q.put(("read", (res.ok, res.error, [t[blocks].numpy() for t in dst])))  # plain pickles: no fd to outlive us
    q.close()
    q.join_thread()
    os.kill(os.getpid(), signal.SIGKILL)


def producer_killed_after_claim(q: Any, num_blocks: int) -> None:
    """Serves caches with request "p1" offered; SIGKILLs itself just after answering the Claim."""
    from kv_transfer.paged import PagedLayout
    from kv_transfer.rma_kv import Claim, RmaKVServer

    class Dying(RmaKVServer):
        def _answer(self, pid: int, msg: Any) -> Any:
            if isinstance(msg, Claim):  # the reader gets its block ids, then the owner dies under its GETs
                threading.Timer(0.005, os.kill, (os.getpid(), signal.SIGKILL)).start()
            return super()._answer(pid, msg)

    src = caches(1, num_blocks=num_blocks, heads=8, width=256)
    server = Dying(src, PagedLayout.vllm_cpu(), lease_s=30)
    server.offer("p1", list(range(10)), list(range(num_blocks - 1, -1, -1)))
    q.put(("addr", server.address))
    time.sleep(120)
