"""Process bodies for tests/test_cuda_fast_path.py (CUDA payload tensors through the compiled path).

Each body counts the calls of the Pipe's ordinary send and receive (``Pipe._post_send``,
``Pipe._post_recv``) while the data moves, so the test can tell which path carried it: the
compiled path makes neither call for a payload tensor whose header is the one expected.
"""

from __future__ import annotations

from typing import Any

import torch

from tests.peers import _report, same_bits

#: The tensors of a run: (dtype, elements). All are payloads (never inline): 20 KB, 1 MiB, 16 MiB.
CASES = [(torch.bfloat16, 10_000), (torch.float32, 1 << 18), (torch.float32, 1 << 22)]
WINDOW = 8  # tensors of a stream, received as one recv_tensors(out=...) window
STREAM_ELEMS = 1 << 18  # float32: 1 MiB each


def case(i: int, dtype: torch.dtype, n: int) -> torch.Tensor:
    """Tensor ``i`` of a run, on the CPU (the same on both sides: a seeded generator)."""
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(n, generator=g).to(dtype)


def _counting() -> dict[str, int]:
    """Count the ordinary path's send and receive posts in this process from now on."""
    from transport.pipe import Pipe

    counts = {"_post_send": 0, "_post_recv": 0}
    for name in counts:
        real = getattr(Pipe, name)

        def wrapped(self: Any, *a: Any, _real: Any = real, _name: str = name, **k: Any) -> Any:
            counts[_name] += 1
            return _real(self, *a, **k)

        setattr(Pipe, name, wrapped)
    return counts


def sender(q: Any, address: str, src: str) -> None:
    """Sends each of CASES with send_tensor, then a stream of WINDOW tensors with send_tensor_async
    (all in flight at once), from ``src``; reports the ordinary path's post counts."""
    from transport import Pipe

    def body() -> dict[str, int]:
        with Pipe.connect(address, timeout_s=60) as p:
            counts = _counting()
            for i, (dt, n) in enumerate(CASES):
                p.send_tensor(case(i, dt, n).to(src))
            stream = [case(10 + i, torch.float32, STREAM_ELEMS).to(src) for i in range(WINDOW)]
            for h in [p.send_tensor_async(t) for t in stream]:
                h.wait(60)
            got = dict(counts)
            p.recv_tensor(timeout=60)
            return got

    _report(q, body)


def receiver(q: Any, dst: str) -> None:
    """Receives CASES one by one into ``out`` tensors on ``dst``, then the stream as one window; reports
    (whether every tensor arrived bit-exact, the ordinary path's post counts)."""
    from transport import Pipe

    def body() -> tuple[list[str], dict[str, int]]:
        with Pipe.listen("127.0.0.1", 0, timeout_s=60) as p:
            q.put(("addr", p.address))
            counts = _counting()
            wrong = []
            for i, (dt, n) in enumerate(CASES):
                out = torch.full((n,), -1.0, dtype=dt, device=dst)
                p.recv_tensor(out=out, timeout=60)
                why = same_bits(case(i, dt, n), out.cpu())
                if why is not None:
                    wrong.append(f"case {i}: {why}")
            outs = [torch.full((STREAM_ELEMS,), -1.0, device=dst) for _ in range(WINDOW)]
            p.recv_tensors(out=outs, timeout=60)
            for i, o in enumerate(outs):
                why = same_bits(case(10 + i, torch.float32, STREAM_ELEMS), o.cpu())
                if why is not None:
                    wrong.append(f"stream {i}: {why}")
            got = dict(counts)
            p.send_tensor(None)
            return wrong, got

    _report(q, body)


def shape_sender(q: Any, address: str) -> None:
    """Sends a CUDA float32 tensor of 1 << 18 elements, then waits for the receiver's word."""
    from transport import Pipe

    def body() -> str:
        with Pipe.connect(address, timeout_s=60) as p:
            p.send_tensor(torch.ones(1 << 18, device="cuda"))
            p.recv_tensor(timeout=60)
            return "sent"

    _report(q, body)


def shape_receiver(q: Any) -> None:
    """Receives into a CUDA ``out`` of the same bytes but another shape; reports the error raised."""
    from transport import Pipe

    def body() -> tuple[str, str]:
        with Pipe.listen("127.0.0.1", 0, timeout_s=60) as p:
            q.put(("addr", p.address))
            out = torch.zeros(1 << 17, 2, device="cuda")
            try:
                p.recv_tensor(out=out, timeout=60)
            except Exception as exc:  # noqa: BLE001 - reported to the test
                err = (type(exc).__name__, str(exc))
            else:
                err = ("", "no error")
            try:  # the sender waits for a word; a broken pipe may not deliver it (the test ends it)
                p.send_tensor(None, timeout=5)
            except Exception:  # noqa: BLE001
                pass
            return err

    _report(q, body)
