"""CPU time of the Pipe's own per-message code, free of scheduling: one process, one thread.

Run: ``python -m bench.msg_cost [--size 8] [--tls sm] [--message]``. A pipe pair in this
process; ``send_tensor`` on one end, then ``recv_tensor(out=)`` on the other, N times
(``--message``: ``send_message`` of a 64-byte body with the tensor, then ``recv_message``,
the lookup wire's calls); each message has arrived before its receive, so no waiting is
timed. Prints the thread CPU time per call (each call timed on its own), best of R rounds:
a figure that a loaded machine inflates far less than a ping-pong's wall clock
(docs/bench.md, "Second pass"). (Before session 9 it sent N messages, then received N: the
progress thread's sweep parks messages nobody has asked for, so that receive measured the
parked-message path, not the one a ping-pong takes.)
"""

from __future__ import annotations

import argparse
import os
import time


def measure(size: int, n: int, rounds: int, message: bool = False) -> tuple[float, float]:
    """(send, receive) thread CPU µs per call, best of ``rounds`` x ``n``: ``send_tensor`` and
    ``recv_tensor(out=)``, or with ``message`` ``send_message`` and ``recv_message``."""
    import torch

    from transport import Pipe

    a = Pipe.listen()
    b = Pipe.connect(a.address)
    try:
        a.wait_connected(30)
        t = torch.arange(size, dtype=torch.int64).to(torch.uint8)
        rb = torch.empty(size, dtype=torch.uint8)
        if message:
            body = bytes(64)

            def send() -> None:
                b.send_message(body, [t])

            def recv() -> None:
                rb.copy_(a.recv_message()[1][0])
        else:
            def send() -> None:
                b.send_tensor(t)

            def recv() -> None:
                a.recv_tensor(out=rb)
        for _ in range(200):
            send()
            recv()
        best_s = best_r = float("inf")
        clock = time.thread_time_ns
        for _ in range(rounds):
            spent_s = spent_r = 0
            for _ in range(n):
                c0 = clock()
                send()
                c1 = clock()
                recv()
                c2 = clock()
                spent_s += c1 - c0
                spent_r += c2 - c1
            best_s, best_r = min(best_s, spent_s / n / 1e3), min(best_r, spent_r / n / 1e3)
        if not torch.equal(rb, t):
            raise RuntimeError("the last tensor received differs from the one sent")
        return best_s, best_r
    finally:
        b.close()
        a.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8, help="bytes per tensor (8)")
    ap.add_argument("-n", type=int, default=2000, help="calls per round (2000)")
    ap.add_argument("-r", "--rounds", type=int, default=7, help="rounds, the best is kept (7)")
    ap.add_argument("--tls", default=None, help="UCX_TLS for this process")
    ap.add_argument("--message", action="store_true", help="send_message / recv_message instead")
    args = ap.parse_args()
    if args.tls:
        os.environ["UCX_TLS"] = args.tls
    s, r = measure(args.size, args.n, args.rounds, args.message)
    calls = ("send_message", "recv_message") if args.message else ("send_tensor", "recv_tensor(out=)")
    print(f"size {args.size} B UCX_TLS={os.environ.get('UCX_TLS', 'default')} load={os.getloadavg()[0]:.2f}: "
          f"{calls[0]} {s:.1f} us CPU, {calls[1]} {r:.1f} us CPU (best of {args.rounds}x{args.n})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
