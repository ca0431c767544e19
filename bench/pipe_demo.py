"""Two processes on this machine move tensors through a Pipe (``python -m bench.pipe_demo``).

Prints what moved (dtype, shape, bytes), whether it arrived bit-exact, and how
fast.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import torch

CASES = [
    ("bfloat16", (4, 128)),
    ("float16", (1024, 1024)),
    ("float32", (16, 1024, 1024)),
    ("int64", (3, 5, 7)),
    ("bool", (1000,)),
    ("uint8", (256 << 20,)),
]


def _make(i: int, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    dt = getattr(torch, dtype)
    if dt == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dt.is_floating_point:
        return torch.randn(shape, generator=g).to(dt)
    return torch.randint(0, 100, shape, generator=g, dtype=dt)


def _receiver(q: "mp.Queue", repeat: int) -> None:
    from transport import Pipe

    with Pipe.listen("127.0.0.1", 0) as p:
        q.put(p.address)
        for i, (dtype, shape) in enumerate(CASES):
            expect = _make(i, dtype, shape)
            for _ in range(repeat):
                got = p.recv_tensor()
                ok = got.dtype == expect.dtype and torch.equal(got.view(torch.uint8) if got.dim() else got, expect.view(torch.uint8) if expect.dim() else expect)
            p.send_tensor(torch.tensor([int(ok)]))
        p.recv_tensor()  # the sender's None: end of stream


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=5, help="sends per case (the first warms up)")
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(q, args.repeat), daemon=True)
    proc.start()
    from transport import Pipe

    addr = q.get(timeout=60)
    print(f"receiver listening on {addr}; sending {len(CASES)} cases x {args.repeat}")
    print(f"{'dtype':>10} {'shape':>18} {'bytes':>12} {'ok':>4} {'best time':>11} {'MiB/s':>9}")
    with Pipe.connect(addr) as p:
        for i, (dtype, shape) in enumerate(CASES):
            t = _make(i, dtype, shape)
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                p.send_tensor(t)
                times.append(time.perf_counter() - t0)
            ok = bool(p.recv_tensor(timeout=60).item())
            nbytes = t.numel() * t.element_size()
            best = min(times[1:] or times)
            print(f"{dtype:>10} {str(tuple(shape)):>18} {nbytes:>12} {'yes' if ok else 'NO':>4} "
                  f"{best * 1e6:>9.0f}us {nbytes / best / 2**20:>9.0f}")
        p.send_tensor(None)
    proc.join(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
