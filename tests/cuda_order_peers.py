"""Process bodies for tests/test_cuda_order.py.

Each body queues about 0.2 s of GPU sleep (``torch.cuda._sleep``) and then the kernel that
matters (a fill, a copy, a read) right before a transfer. UCX touches CUDA memory from
streams of its own, so a transfer that does not wait for the caller's stream moves the
memory as it was before that kernel ran, and the check sees it.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from tests.peers import _report

#: About 0.2 s of GPU time at the ~2 GHz clock of an H100/H200: far longer than a transfer takes.
SLEEP_CYCLES = 400_000_000
N = 1 << 22  # float32 elements: 16 MiB, a payload (never inline), a rendezvous over cuda_ipc


def _queued(fill: float, shape: tuple[int, ...] = (N,)) -> torch.Tensor:
    """A CUDA tensor of zeros whose ``fill_(fill)`` is queued behind a long sleep on the current stream."""
    t = torch.zeros(shape, device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)
    t.fill_(fill)
    return t


def _span(t: torch.Tensor) -> tuple[float, float]:
    return float(t.min()), float(t.max())


def sender(q: Any, address: str) -> None:
    """Sends a tensor whose fill is still queued, then a strided view whose contiguous copy will be."""
    from transport import Pipe

    def body() -> str:
        with Pipe.connect(address, timeout_s=60) as p:
            p.send_tensor(_queued(7.0))
            p.send_tensor(_queued(7.0, (2048, 2048)).t())
            p.recv_tensor(timeout=60)
            return "sent"

    _report(q, body)


def receiver(q: Any, dst: str) -> None:
    """Receives two tensors on ``dst``; reports each one's (min, max)."""
    from transport import Pipe

    def body() -> list[tuple[float, float]]:
        with Pipe.listen("127.0.0.1", 0, timeout_s=60, device=dst) as p:
            q.put(("addr", p.address))
            got = [_span(p.recv_tensor(timeout=60)) for _ in range(2)]
            p.send_tensor(None)
            return got

    _report(q, body)


def plain_sender(q: Any, address: str) -> None:
    """Sends a marker, then a CUDA tensor of fives (ready before the send)."""
    from transport import Pipe

    def body() -> str:
        with Pipe.connect(address, timeout_s=60) as p:
            p.send_tensor(torch.zeros(1))
            five = torch.full((N,), 5.0, device="cuda")
            torch.cuda.synchronize()
            p.send_tensor(five)
            p.recv_tensor(timeout=60)
            return "sent"

    _report(q, body)


def out_receiver(q: Any) -> None:
    """Receives into ``out`` while a kernel that reads ``out`` is still queued; reports (that kernel's
    result, out) as (min, max) pairs. Right: the kernel saw ones (2.0), out holds fives."""
    from transport import Pipe

    def body() -> list[tuple[float, float]]:
        with Pipe.listen("127.0.0.1", 0, timeout_s=60, device="cuda") as p:
            q.put(("addr", p.address))
            p.recv_tensor(timeout=60)  # the marker: the big one is on its way
            out = torch.ones(N, device="cuda")
            torch.cuda.synchronize()
            time.sleep(0.3)  # it has arrived (its rendezvous waits for our receive)
            torch.cuda._sleep(SLEEP_CYCLES)
            doubled = out * 2  # queued: reads out once the sleep is over
            p.recv_tensor(out=out, timeout=60)
            torch.cuda.synchronize()
            p.send_tensor(None)
            return [_span(doubled), _span(out)]

    _report(q, body)


def rma_producer(q: Any, offered: Any) -> None:
    """Serves two CUDA layer caches; on a side stream, queues a sleep and the fill of blocks 0..3 with
    3.0, offers request "r1" at once, and sets ``offered``."""
    from kv_transfer.paged import PagedLayout
    from kv_transfer.rma_kv import RmaKVServer

    def body() -> str:
        caches = [torch.zeros(8, 2, 4, 4096, device="cuda") for _ in range(2)]
        server = RmaKVServer(caches, PagedLayout.vllm_cpu(), lease_s=60)
        q.put(("addr", server.address))
        torch.cuda.synchronize()
        side = torch.cuda.Stream()  # a non-blocking stream, as an engine's own may be
        with torch.cuda.stream(side):
            torch.cuda._sleep(SLEEP_CYCLES)
            for c in caches:
                c[:4].fill_(3.0)
            server.offer("r1", list(range(16)), [0, 1, 2, 3])
        offered.set()
        time.sleep(30)  # the test ends this process
        return "served"

    _report(q, body)


def rma_reader(q: Any, address: str, offered: Any) -> None:
    """Loads request "r1" into blocks 4..7 of its own CUDA caches as soon as it is offered; reports the
    (min, max) of what landed."""
    from kv_transfer.paged import PagedLayout
    from kv_transfer.rma_kv import RmaKVClient
    from transport import register

    def body() -> tuple[Any, float, float]:
        dst = [torch.zeros(8, 2, 4, 4096, device="cuda") for _ in range(2)]
        c = RmaKVClient(address, dst, [register(t) for t in dst], PagedLayout.vllm_cpu(), timeout_s=30)
        c._connect()
        if not offered.wait(60):
            raise TimeoutError("the producer never offered r1")
        res = c.load("r1", list(range(16)), [4, 5, 6, 7])
        got = torch.stack([t[4:] for t in dst])
        return (res.error, *_span(got))

    _report(q, body)


def lookup_producer(q: Any, inserted: Any) -> None:
    """Serves a LookupBuffer; on a side stream, queues a sleep and the fill of a CUDA tensor, inserts it
    at once as request "r1", and sets ``inserted``."""
    from kv_transfer import LookupBuffer

    def body() -> str:
        buf = LookupBuffer(1 << 30, lease_s=60)
        server = buf.serve("127.0.0.1", 0)
        q.put(("addr", server.address))
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            t = _queued(7.0)
            buf.insert(None, None, None, [t], None, request_id="r1", timeout=10)
        inserted.set()
        time.sleep(30)
        return "served"

    _report(q, body)


def lookup_consumer(q: Any, address: str, inserted: Any) -> None:
    """Fetches request "r1" onto the GPU as soon as it is inserted; reports its (min, max)."""
    from kv_transfer import LookupClient

    def body() -> tuple[float, float]:
        with LookupClient(address, timeout_s=30) as client:
            if not inserted.wait(60):
                raise TimeoutError("the producer never inserted r1")
            m = client.fetch(request_id="r1", wait_s=10, device="cuda")
            if m is None:
                raise LookupError("r1 not found")
            return _span(m.value[0])

    _report(q, body)


def local_lookup(q: Any) -> None:
    """On a side stream, queues a sleep and the fill of a CUDA tensor, inserts it as request "r1", then
    fetches it in this process at once (on the default stream) and reports its (min, max)."""
    from kv_transfer import LookupBuffer

    def body() -> tuple[float, float]:
        buf = LookupBuffer(1 << 30, lease_s=60)
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            buf.insert(None, None, None, [_queued(7.0)], None, request_id="r1", timeout=10)
        m = buf.fetch(request_id="r1")
        if m is None:
            raise LookupError("r1 not found")
        return _span(m.value[0])

    _report(q, body)
