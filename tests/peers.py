"""Process bodies for tests: each runs in its own spawned process.

They report back through a multiprocessing queue as plain tuples so the test
process never touches UCX itself.
"""

from __future__ import annotations

import os
import time
import traceback
from typing import Any

import torch

N_MIXED = 1000
BIG_INDEX = 500
BIG_BYTES = 256 << 20


def mixed_case(i: int) -> torch.Tensor | None:
    """The i-th tensor of the mixed stream: every dtype, odd shapes, None, strided views, one 256 MiB."""
    from transport._envelope import DTYPES

    if i % 37 == 36:
        return None
    g = torch.Generator().manual_seed(1000 + i)
    names = sorted(DTYPES)
    dtype = DTYPES[names[i % len(names)]]
    if i == BIG_INDEX:
        return torch.randint(0, 256, (BIG_BYTES,), dtype=torch.uint8, generator=g)
    kind = i % 7
    if kind == 0:
        shape: tuple[int, ...] = ()
    elif kind == 1:
        shape = (int(torch.randint(0, 3, (1,), generator=g)), 0, 3)
    elif kind == 2:
        shape = (int(torch.randint(1, 300_000, (1,), generator=g)),)  # past the inline limit
    else:
        nd = int(torch.randint(1, 5, (1,), generator=g))
        shape = tuple(int(x) for x in torch.randint(1, 9, (nd,), generator=g))
    n = 1
    for s in shape:
        n *= s
    item = dtype.itemsize
    if dtype == torch.bool:
        t = torch.randint(0, 2, (n,), generator=g, dtype=torch.uint8).view(torch.bool)
    else:
        t = torch.randint(0, 256, (n * item,), generator=g, dtype=torch.uint8).view(dtype)
    t = t.reshape(shape)
    if i % 5 == 3 and t.dim() >= 2:
        t = t.transpose(0, 1)  # non-contiguous
    elif i % 5 == 4 and t.dim() == 1 and t.numel() > 2:
        t = t[::2]
    return t


def same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> str | None:
    """None when ``a`` and ``b`` match bit for bit (dtype, shape, bytes); else what differs."""
    if a is None or b is None:
        return None if a is None and b is None else f"None vs {type(b).__name__}"
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return f"{a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    ab = a.contiguous().reshape(-1).view(torch.uint8)
    bb = b.contiguous().reshape(-1).view(torch.uint8)
    return None if torch.equal(ab, bb) else "bytes differ"


def _report(q: Any, fn: Any) -> None:
    try:
        q.put(("ok", fn()))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the test
        q.put(("error", type(exc).__name__, str(exc), traceback.format_exc()))
    q.close()
    q.join_thread()  # flush before the process exits


def _set_tls(tls: str) -> None:
    if tls == "default":
        os.environ.pop("UCX_TLS", None)
    else:
        os.environ["UCX_TLS"] = tls


# -- the two streams of the data tests: what a sender puts on a pipe, and how a receiver checks it --
def _send_mixed(p: Any) -> dict:
    """The mixed stream, its tensors sent in turn three ways (blocking, async, in a list)."""
    handles = []
    for i in range(N_MIXED):
        t = mixed_case(i)
        if i % 3 == 0:
            p.send_tensor(t)
        elif i % 3 == 1:
            handles.append(p.send_tensor_async(t))
        else:
            p.send_tensors([t])
    for h in handles:
        h.wait()
    return {}


def _receive_mixed(p: Any) -> list:
    """What differs from the mixed stream, as ``(index, why)``."""
    return [(i, why) for i in range(N_MIXED) if (why := same_bits(mixed_case(i), p.recv_tensor()))]


#: Messages in the envelope test, and the tensors each carries (mixed_case numbering, BIG_INDEX excluded).
N_MESSAGES = 30
PER_MESSAGE = 33


def message_tensors(k: int) -> list[torch.Tensor | None]:
    """The tensors of message ``k``: a slice of the mixed stream (every dtype, inline and payload sizes, None)."""
    return [mixed_case(i) for i in range(k * PER_MESSAGE, (k + 1) * PER_MESSAGE) if i != BIG_INDEX]


def _send_messages(p: Any) -> dict:
    """N_MESSAGES envelopes, each followed by one bare tensor; reports how many UCX messages each took
    (``posted``: one header plus a payload per big tensor) and how many big tensors each had (``big``)."""
    eng = p._engine
    posted = []

    def counting(real: Any) -> Any:
        def send(*a: Any, **kw: Any) -> Any:  # counts, then does the real send
            posted[-1] += 1
            return real(*a, **kw)

        return send

    # every UCX message goes out through one of these (send_frame: the compiled one-message path)
    eng.tag_send, eng.send_frame = counting(eng.tag_send), counting(eng.send_frame)
    try:
        for k in range(N_MESSAGES):
            posted.append(0)
            h = p.send_message_async(f"message {k}".encode(), message_tensors(k))
            p.send_tensor(torch.tensor(k))
            h.wait()
    finally:
        del eng.tag_send, eng.send_frame
    big = [sum(1 for t in message_tensors(k) if t is not None and t.numel() * t.element_size() > 8192)
           for k in range(N_MESSAGES)]
    return {"posted": posted, "big": big}


def _receive_messages(p: Any) -> list:
    """What differs from the envelopes and their bare tensors, checked bit for bit."""
    bad = []
    for k in range(N_MESSAGES):
        got_body, got = p.recv_message(max_tensors=PER_MESSAGE)
        want = message_tensors(k)
        if got_body != f"message {k}".encode() or len(got) != len(want):
            bad.append((k, "body or count", got_body[:40], len(got)))
        bad += [(k, i, why) for i, (w, g) in enumerate(zip(want, got)) if (why := same_bits(w, g))]
        tail = p.recv_tensor()
        if tail is None or int(tail) != k:
            bad.append((k, "bare tensor after it", tail))
    return bad


#: stream name -> (how a sender sends it, how a receiver checks it)
STREAMS = {"mixed": (_send_mixed, _receive_mixed), "messages": (_send_messages, _receive_messages)}


def stream_receiver(q: Any, tls: str, stream: str) -> None:
    """Listens on loopback, reports ``("addr", address)``, receives ``stream`` (a key of STREAMS) and
    reports ``("ok", {"bad": what differed, "bytes": bytes received})``."""
    _set_tls(tls)
    from transport import Pipe

    def body() -> Any:
        with Pipe.listen("127.0.0.1", 0, timeout_s=120) as p:
            q.put(("addr", p.address))
            return {"bad": STREAMS[stream][1](p), "bytes": p.bytes_received}

    _report(q, body)


def stream_sender(q: Any, tls: str, address: str, stream: str) -> None:
    """Connects to ``address``, sends ``stream`` (a key of STREAMS) and reports
    ``("ok", {"bytes": bytes sent, ...what the stream's sender adds})``."""
    _set_tls(tls)
    from transport import Pipe

    def body() -> Any:
        with Pipe.connect(address, timeout_s=120) as p:
            extra = STREAMS[stream][0](p)
            return {"bytes": p.bytes_sent, **extra}  # close at once: the Goodbye must not overtake the data

    _report(q, body)


def streaming_sender(q: Any, tls: str, address: str, peer_timeout: float) -> None:
    """Sends 64 MiB tensors until something fails; reports the error and how long it took to see it."""
    os.environ["UCX_TLS"] = tls
    from transport import Pipe

    def body() -> Any:
        p = Pipe.connect(address, timeout_s=30, peer_timeout_s=peer_timeout, heartbeat_s=0.2)
        t = torch.ones(64 << 20, dtype=torch.uint8)
        q.put(("ready", os.getpid()))
        for _ in range(100000):
            p.send_tensor(t)
        return "never failed"

    _report(q, body)


def streaming_receiver(q: Any, tls: str, peer_timeout: float) -> None:
    os.environ["UCX_TLS"] = tls
    from transport import Pipe

    def body() -> Any:
        p = Pipe.listen("127.0.0.1", 0, timeout_s=30, peer_timeout_s=peer_timeout, heartbeat_s=0.2)
        q.put(("addr", p.address))
        q.put(("ready", os.getpid()))
        while True:
            p.recv_tensor()

    _report(q, body)


def one_tensor_sender(q: Any, address: str) -> None:
    from transport import Pipe

    def body() -> Any:
        with Pipe.connect(address, timeout_s=30) as p:
            p.send_tensor(torch.arange(1000, dtype=torch.int32))
            p.recv_tensor(timeout=30)
            return "sent"

    _report(q, body)


def cuda_peer(q: Any, role: str, address: str | None, src_dev: str, dst_dev: str, use_cupy: bool = False) -> None:
    """GPU test body: sends tensors from ``src_dev``; the receiver lands them on ``dst_dev``."""
    from transport import Pipe

    def body() -> Any:
        if role == "recv":
            with Pipe.listen("127.0.0.1", 0, timeout_s=60, device=dst_dev) as p:
                q.put(("addr", p.address))
                out = []
                for i in range(4):
                    t = p.recv_tensor()
                    out.append((str(t.device), same_bits(cuda_case(i).cpu(), t.cpu())))
                p.send_tensor(None)
                return out
        with Pipe.connect(address, timeout_s=60) as p:
            for i in range(4):
                t = cuda_case(i).to(src_dev)
                if i == 3 and use_cupy:
                    import cupy  # cupy arrays are accepted too

                    t = cupy.asarray(t)
                p.send_tensor(t)
            p.recv_tensor()
            return "sent"

    _report(q, body)


def cuda_case(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    n = [10, 5000, 1 << 22, 1 << 20][i]
    dt = [torch.bfloat16, torch.float16, torch.float32, torch.float32][i]
    return torch.randn(n, generator=g).to(dt)


def wake_peer(q: Any, back: Any, tls: str, addresses: list[str], echoes: int, plan: list[int], gap_s: float) -> None:
    """Connect to every address; echo ``echoes`` tensors on the first pipe, then send to the others:
    for each index ``i`` of ``plan``, after ``gap_s``, a float64 tensor of ``time.monotonic()`` on pipe
    ``i``; then ``-1.0`` on each. Closes when ``back`` says so (tests/test_wake_owner.py)."""
    _set_tls(tls)
    from transport import Pipe

    def run() -> dict:
        pipes = [Pipe.connect(a) for a in addresses]
        try:
            for p in pipes:
                p.wait_connected(30)
            q.put(("connected",))
            for _ in range(echoes):
                pipes[0].send_tensor(pipes[0].recv_tensor(timeout=30))
            for i in plan:
                time.sleep(gap_s)
                pipes[i].send_tensor(torch.tensor([time.monotonic()], dtype=torch.float64))
            for p in pipes[1:]:
                p.send_tensor(torch.tensor([-1.0], dtype=torch.float64))
            back.get(timeout=60)
        finally:
            for p in pipes:
                p.close()
        return {}

    _report(q, run)


def closing_peer(q: Any, tls: str, address: str, after_s: float) -> None:
    """Connect to ``address``, stay idle ``after_s`` seconds, close the pipe; report when it closed."""
    _set_tls(tls)
    from transport import Pipe

    def body() -> Any:
        p = Pipe.connect(address, timeout_s=30)
        time.sleep(after_s)
        t = time.monotonic()  # CLOCK_MONOTONIC: the same clock in every process
        p.close()
        return t

    _report(q, body)
