"""Process bodies for the lookup-buffer and connector tests (each runs in a spawned process).

They report through a multiprocessing queue as plain tuples (``("ok", result)``
or ``("error", type, message, traceback)``, see :func:`tests.peers._report`),
so the test process never touches UCX itself. Cases are built from seeds, so
producer and consumer rebuild the same data independently.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List

import torch

from tests.peers import _report

BLOCK_SIZE = 4
NUM_LAYERS = 2
N_REQUESTS = 200
CASES = [(lay, dt) for lay in ("vllm_cpu", "flash_attn") for dt in ("float32", "bfloat16", "float16")]


# -- deterministic cases ---------------------------------------------------------
def _random_bits(shape: tuple, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)  # any bit pattern, NaNs included


def _cache_shape(layout_name: str, num_blocks: int) -> tuple:
    if layout_name == "vllm_cpu":
        return (num_blocks, 2, BLOCK_SIZE, 8)  # (blocks, heads, block_size, 2*head_dim)
    return (2, num_blocks, BLOCK_SIZE, 2, 4)  # (kv, blocks, block_size, heads, head_dim)


def make_case(layout_name: str, dtype_name: str, seed: int, side: str) -> Dict[str, Any]:
    """Caches and requests of one side ("src" or "dst"); both sides share request ids and tokens."""
    from kv_transfer import KVRequest, PagedLayout

    layout = getattr(PagedLayout, layout_name)()
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 41, (N_REQUESTS,), generator=g).tolist()
    tokens = [torch.randint(0, 32000, (n,), generator=g) for n in lengths]
    nblocks = [(n + BLOCK_SIZE - 1) // BLOCK_SIZE for n in lengths]
    total = sum(nblocks)
    num_blocks = total + 37
    gs = torch.Generator().manual_seed(seed * 10 + (1 if side == "src" else 2))
    perm = torch.randperm(num_blocks, generator=gs).tolist()  # non-overlapping random ids
    reqs, pos = [], 0
    for i, (t, nb) in enumerate(zip(tokens, nblocks)):
        reqs.append(KVRequest(f"{layout_name}-{dtype_name}-{i}", t, perm[pos:pos + nb]))
        pos += nb
    caches = [_random_bits(_cache_shape(layout_name, num_blocks), dtype, gs) for _ in range(NUM_LAYERS)]
    return {"layout": layout, "reqs": reqs, "caches": caches}


def check_case(layout_name: str, dtype_name: str, seed: int, dst: Dict[str, Any]) -> List[str]:
    """Compare the consumer's caches with the producer's, bit for bit; list what differs."""
    from kv_transfer import gather_blocks

    src = make_case(layout_name, dtype_name, seed, "src")
    fresh = make_case(layout_name, dtype_name, seed, "dst")
    layout, bad = src["layout"], []
    used = set()
    for rs, rd in zip(src["reqs"], dst["reqs"]):
        used.update(rd.block_list())
        a = gather_blocks(src["caches"], layout, rs.block_list())
        b = gather_blocks(dst["caches"], layout, rd.block_list())
        ia, ib = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
        if not torch.equal(ia, ib):
            bad.append(f"{rd.request_id}: bytes differ")
    untouched = [i for i in range(layout.num_blocks(dst["caches"][0])) if i not in used]
    a = gather_blocks(fresh["caches"], layout, untouched).reshape(-1).view(torch.uint8)
    b = gather_blocks(dst["caches"], layout, untouched).reshape(-1).view(torch.uint8)
    if not torch.equal(a, b):
        bad.append(f"{layout_name}/{dtype_name}: blocks outside the requests were written")
    return bad


def transport_envelope_header(pipe: Any, timeout: float) -> tuple:
    """Receive only the header frame of the next envelope on ``pipe`` (its payloads stay unreceived, the
    sender's transfer in flight): ``(body, inline views)``. A test's way to stall a sender mid-message."""
    import numpy as np

    from transport import _envelope as env
    from transport._engine import Op

    frame = np.empty(env.HEADER_FRAME_SIZE, dtype=np.uint8)
    seq = pipe._recv_seq
    req = pipe._engine.tag_recv(pipe._ep, frame, pipe._tag(pipe._recv_tag, seq, False), None, "header", pipe._ep_open)
    pipe._engine.wait(Op([req], [frame]), time.monotonic() + timeout, "an envelope header")
    h, inline = env.decode_header(memoryview(frame)[:req.length], pipe.peer, seq, 1 << 40)
    return h.body, inline


def _wait_until(pred: Any, timeout: float, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


# -- bit-exact transfer ----------------------------------------------------------
def connector_producer(q: Any, seed: int, capacity: int) -> None:
    from kv_transfer import KVProducer, LookupBuffer

    def body() -> Any:
        buf = LookupBuffer(capacity, lease_s=60)
        server = buf.serve("127.0.0.1", 0)
        q.put(("addr", server.address))
        t0 = time.monotonic()
        for lay, dt in CASES:
            case = make_case(lay, dt, seed, "src")
            KVProducer(buf, case["caches"], case["layout"], insert_timeout_s=30).save(case["reqs"])
        saved = time.monotonic() - t0
        done = _wait_until(lambda: server.served == len(CASES) * N_REQUESTS and buf.bytes_used == 0, 60)
        out = {"done": done, "served": server.served, "bytes_used": buf.bytes_used, "save_s": saved}
        server.close()
        server.close()  # idempotent
        return out

    _report(q, body)


def connector_consumer(q: Any, seed: int, address: str) -> None:
    from kv_transfer import KVConsumer, LookupClient

    def body() -> Any:
        bad: List[str] = []
        not_ok: List[str] = []
        t0 = time.monotonic()
        with LookupClient(address, timeout_s=30) as client:
            for lay, dt in CASES:
                case = make_case(lay, dt, seed, "dst")
                res = KVConsumer(client, case["caches"], case["layout"], wait_s=20).load(case["reqs"])
                not_ok += [f"{k}: {r.error}" for k, r in res.items() if not r.ok]
                bad += check_case(lay, dt, seed, case)
        return {"bad": bad, "not_ok": not_ok, "load_s": time.monotonic() - t0}

    _report(q, body)


# -- no match, lease, prefix, roi, bad version -------------------------------------
def misc_producer(q: Any) -> None:
    from kv_transfer import LookupBuffer

    def body() -> Any:
        buf = LookupBuffer(1 << 20, lease_s=30)
        server = buf.serve("127.0.0.1", 0)
        roi = torch.tensor([True] * 10 + [False] * 2)
        buf.insert(torch.arange(1, 13), roi, torch.ones(100), None, None, request_id="roi")
        buf.insert(torch.arange(100, 120), None, [torch.full((50,), 7.0), torch.full((3,), 8.0)], None,
                   torch.zeros(4, dtype=torch.bfloat16), request_id="prefix")
        q.put(("addr", server.address))
        # the short lease starts only once the consumer is connected (a slow start must not expire it)
        _wait_until(lambda: server.num_consumers > 0, 120)
        buf.insert(torch.arange(500, 510), None, torch.ones(1000), None, None, request_id="lease", lease_s=4.0)
        done = _wait_until(lambda: buf.bytes_used == 0 and server.served == 2 and server.num_consumers == 0, 30)
        out = {"done": done, "expired": buf.expired, "served": server.served, "alive": True}
        server.close()
        return out

    _report(q, body)


def misc_consumer(q: Any, address: str) -> None:
    from kv_transfer import LookupClient
    from kv_transfer import _lookup_wire as wire

    def body() -> Any:
        out: Dict[str, Any] = {}
        with LookupClient(address, timeout_s=10) as c:
            t0 = time.monotonic()
            out["nomatch"] = c.drop_select(torch.tensor([999, 998]), None, wait_s=0.5)
            out["nomatch_s"] = time.monotonic() - t0
            t_wait = time.monotonic()
            while c.stats()["num_entries"] < 3 and time.monotonic() - t_wait < 10:
                time.sleep(0.05)
            out["stats0"] = c.stats()
            # roi: only the masked tokens are compared
            got = c.drop_select(torch.tensor(list(range(1, 11)) + [77, 78]),
                                torch.tensor([True] * 10 + [False] * 2))
            out["roi_key_sum"] = None if got[2] is None else float(got[2].sum())
            # longest prefix
            m = c.fetch(torch.tensor(list(range(100, 110)) + [5, 5]), None, prefix=True)
            out["prefix_matched"] = None if m is None else m.matched
            out["prefix_key"] = None if m is None else [t.tolist()[:2] for t in m.key]
            out["prefix_hidden"] = None if m is None else str(m.hidden.dtype)
            # a message of another version: answered with an error, the server lives on
            bad = bytearray(wire.encode(wire.Stats(seq=99)))
            bad[4] = 99
            c._pipe.send_message(bytes(bad))
            ans = wire.decode_response(c._pipe.recv_message(timeout=10)[0], address)
            out["version"] = f"{type(ans).__name__} {getattr(ans, 'code', '')}: {getattr(ans, 'message', '')}"
            # lease expiry: the unclaimed entry disappears and its bytes are released
            t1 = time.monotonic()
            while c.stats()["bytes_used"] and time.monotonic() - t1 < 10:
                time.sleep(0.1)
            out["stats_end"] = c.stats()
            out["lease_wait_s"] = time.monotonic() - t1
        return out

    _report(q, body)


# -- a consumer killed mid-fetch -----------------------------------------------------
BIG = 8 << 20


def kill_producer(q: Any) -> None:
    from kv_transfer import LookupBuffer

    def body() -> Any:
        buf = LookupBuffer(64 << 20, lease_s=3.0)
        server = buf.serve("127.0.0.1", 0, peer_timeout_s=2.0, heartbeat_s=0.2, send_timeout_s=20)
        buf.insert(torch.arange(10), None, torch.arange(1000), None, None, request_id="other", lease_s=60)
        q.put(("addr", server.address))
        _wait_until(lambda: server.num_consumers > 0, 120)  # the 3 s lease starts once the victim is here
        buf.insert(None, None, torch.ones(BIG, dtype=torch.uint8), None, None, request_id="victim")
        done = _wait_until(lambda: buf.bytes_used == 0 and server.failed_sends >= 1 and server.served == 1
                           and server.num_consumers == 0, 30)
        out = {"done": done, "failed_sends": server.failed_sends, "served": server.served,
               "expired": buf.expired, "bytes_used": buf.bytes_used}
        server.close()
        return out

    _report(q, body)


def hanging_consumer(q: Any, address: str) -> None:
    """Asks for the big entry, then never reads the answer (and gets SIGKILLed)."""
    from kv_transfer import LookupClient
    from kv_transfer import _lookup_wire as wire

    def body() -> Any:
        c = LookupClient(address, timeout_s=10, peer_timeout_s=2.0, heartbeat_s=0.2)
        c._pipe.send_message(wire.encode(wire.Fetch(1, "victim", wait_s=30.0)), [None, None])
        # the answer's header arrives first; its 8 MiB payload is never received
        head, inline = transport_envelope_header(c._pipe, 30)
        head = wire.decode_response(head, address)
        assert isinstance(head, wire.Found), head  # the producer claimed it and is sending
        q.put(("sent", os.getpid()))
        time.sleep(120)
        return "not killed"

    _report(q, body)


def other_consumer(q: Any, address: str) -> None:
    from kv_transfer import LookupClient

    def body() -> Any:
        with LookupClient(address, timeout_s=10) as c:
            m = c.fetch(torch.arange(10), None, request_id="other", wait_s=5)
            ok = m is not None and torch.equal(m.key, torch.arange(1000))
            if not ok:
                ok = f"unexpected: {m!r}"[:300]
            t0 = time.monotonic()
            while c.stats()["bytes_used"] and time.monotonic() - t0 < 20:
                time.sleep(0.1)
            return {"got_other": ok, "stats": c.stats(), "freed_after_s": time.monotonic() - t0}

    _report(q, body)


# -- full buffer, three concurrent consumers -------------------------------------------
ENTRY_ELEMS = 16 << 10  # 64 KiB of float32 per entry
N_CONSUMERS = 3
PER_CONSUMER = 20


def _full_entry(k: int, i: int) -> torch.Tensor:
    return torch.arange(ENTRY_ELEMS, dtype=torch.float32) + (k * 1000 + i)


def full_producer(q: Any) -> None:
    from kv_transfer import LookupBuffer

    def body() -> Any:
        cap = 4 * (ENTRY_ELEMS * 4 + 64)
        buf = LookupBuffer(cap, lease_s=60)
        server = buf.serve("127.0.0.1", 0)
        q.put(("addr", server.address))
        max_wait = 0.0
        max_used = 0
        for i in range(PER_CONSUMER):
            for k in range(N_CONSUMERS):
                t0 = time.monotonic()
                buf.insert(torch.tensor([k, i]), None, _full_entry(k, i), None, None, request_id=f"c{k}-{i}",
                           timeout=30)
                max_wait = max(max_wait, time.monotonic() - t0)
                max_used = max(max_used, buf.bytes_used)
        done = _wait_until(lambda: buf.bytes_used == 0 and server.served == N_CONSUMERS * PER_CONSUMER, 30)
        out = {"done": done, "max_wait": max_wait, "max_used": max_used, "capacity": cap,
               "bytes_used": buf.bytes_used, "num_entries": buf.num_entries, "served": server.served}
        server.close()
        return out

    _report(q, body)


def drain_consumer(q: Any, address: str, k: int) -> None:
    from kv_transfer import LookupClient

    def body() -> Any:
        bad = []
        with LookupClient(address, timeout_s=30) as c:
            for i in range(PER_CONSUMER):
                m = c.fetch(torch.tensor([k, i]), None, request_id=f"c{k}-{i}", wait_s=30)
                if m is None or not torch.equal(m.key, _full_entry(k, i)):
                    bad.append(i)
                time.sleep(0.02)  # drain slower than the producer fills
        return {"bad": bad}

    _report(q, body)


# -- a producer restarted on the same port -----------------------------------------
def fixed_port_producer(q: Any, port: int, value: float) -> None:
    """Serves one entry (request ``r<value>``, key filled with ``value``) on ``port`` until killed."""
    from kv_transfer import LookupBuffer

    def body() -> Any:
        buf = LookupBuffer(1 << 20, lease_s=120)
        server = buf.serve("127.0.0.1", port, peer_timeout_s=2.0, heartbeat_s=0.2)
        buf.insert(None, None, torch.full((16,), value), None, None, request_id=f"r{value:g}")
        q.put(("addr", server.address))
        time.sleep(120)
        return "not killed"

    _report(q, body)


# -- integrity: a producer whose staged bytes change after the checksum ------------
def corrupting_producer(q: Any, seed: int, every: int) -> None:
    """Stages the vllm_cpu/float32 case with checksums, flipping one bit of every ``every``-th request."""
    from kv_transfer import KVProducer, LookupBuffer
    from kv_transfer.integrity import flip_one_byte

    def body() -> Any:
        buf = LookupBuffer(64 << 20, lease_s=60)
        server = buf.serve("127.0.0.1", 0)
        q.put(("addr", server.address))
        case = make_case("vllm_cpu", "float32", seed, "src")
        prod = KVProducer(buf, case["caches"], case["layout"], checksum=True)
        flip = flip_one_byte(block=1)
        for i, r in enumerate(case["reqs"]):
            prod.save([r], tamper=flip if i % every == 0 else None)
        done = _wait_until(lambda: server.served == N_REQUESTS and buf.bytes_used == 0, 60)
        server.close()
        return {"done": done}

    _report(q, body)


def verifying_consumer(q: Any, seed: int, address: str) -> None:
    """Loads the case with ``verify=True``; returns the failed request ids and causes, and the bad-bytes list."""
    from kv_transfer import KVConsumer, LookupClient

    def body() -> Any:
        with LookupClient(address, timeout_s=30) as client:
            case = make_case("vllm_cpu", "float32", seed, "dst")
            res = KVConsumer(client, case["caches"], case["layout"], wait_s=20, verify=True).load(case["reqs"])
        failed = {k: r.cause for k, r in res.items() if not r.ok}
        loaded_nothing = all(not res[k].loaded_block_ids for k in failed)
        return {"failed": failed, "loaded_nothing": loaded_nothing, "bad": check_case("vllm_cpu", "float32", seed, case)}

    _report(q, body)
