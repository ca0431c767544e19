"""A tensor stream with Python taken out of one side, or both: which side's per-message Python holds the rate.

Run: ``python -m bench.c_stream [--size 1048576] [-n 4000] [--tls sm] [--send c|pipe] [--recv c|pipe]``
(another tree: ``cd /tmp; PYTHONPATH=TREE python TREE2/bench/c_stream.py ...``). Two processes, one
pipe, CPU tensors with a payload, 8 in flight, the wire of every ucxkv send (a header frame, then the
payload, per tensor). Each side is either

* ``pipe``: what ``tensor_bw`` does, ``send_tensor_async`` with 8 in flight, or
  ``recv_tensors(out=[buf] * 8)``; or
* ``c``: one C call for the whole stream, over the compiled helper's own functions
  (``ukv_send_tensor`` with 8 in flight; ``ukv_recv_tensors`` on windows of 8 that compare each
  header with the expected bytes, with no Python between windows), the engine's lock held throughout.

Prints the stream's MB/s (the sender's: its last send completes once the receiver has taken
every byte) and each side's process CPU per message. The receive buffer is checked after every window. The
settings are ``bench.perftest``'s (``UCX_RNDV_THRESH=8192`` and the others it pins), so the rate
compares with ``ucx_perftest -t tag_bw`` under them. docs/bench.md, "Streams at 1 MiB", has the
four combinations measured here.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import multiprocessing as mp
import os
import time
from typing import Any

WINDOW = 8

_C_SOURCE = r"""
#include <ucp/api/ucp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* the compiled helper's (transport/_ucp_tag.py), loaded before this library */
extern int ukv_send_tensor(ucp_worker_h w, ucp_ep_h ep, uint64_t tag_hdr, const char *hdr, uint32_t hdrlen,
                           uint64_t tag_pay, const void *pay, size_t paylen, int64_t spin_ns, void **reqs,
                           unsigned *progressed);
extern int ukv_wait_requests(ucp_worker_h w, void **r, int n, int64_t spin_ns, unsigned *progressed);
extern int ukv_reap_requests(void **r, int n, int *status);

typedef struct {
    uint64_t hdr_tag, pay_tag; void *frame; uint64_t cap; const void *expect; uint64_t expect_len;
    void *out; uint64_t out_len; uint64_t len; int64_t state; int64_t status; void *req;
} ukv_rslot;
extern int ukv_recv_tensors(ucp_worker_h w, ukv_rslot *s, int k, int64_t spin_ns, unsigned *progressed,
                            int *changed);

/* n sends of pay[0..paylen), header i on tags_h[i], payload on tags_p[i], at most window in flight.
   0, or the first UCS error. */
int cs_send(ucp_worker_h w, ucp_ep_h ep, const uint64_t *tags_h, const uint64_t *tags_p, const char **hdrs,
            const uint32_t *lens, const void *pay, size_t paylen, int n, int window) {
    void **reqs = calloc((size_t)n * 2, sizeof(void *));
    unsigned prog;
    int status = 0, oldest = 0;
    if (reqs == NULL) return UCS_ERR_NO_MEMORY;
    for (int i = 0; i <= n; i++) {
        while (oldest < i && (i - oldest >= window || i == n)) {
            if (ukv_reap_requests(&reqs[2 * oldest], 2, &status) == 0) oldest++;
            else ukv_wait_requests(w, &reqs[2 * oldest], 2, 50000, &prog);
        }
        if (i == n || status) break;
        int rc = ukv_send_tensor(w, ep, tags_h[i], hdrs[i], lens[i], tags_p[i], pay, paylen, 0, &reqs[2 * i],
                                 &prog);
        if (rc < 0) { status = rc; break; }
    }
    free(reqs);
    return status;
}

/* Slots s[0..n), windows of window, each received to the end before the next; on each payload's arrival
   check[0..check_len) must equal the start of out. 0: all done; else -(1000 + slot state) of a slot
   that did not end done, or -1 for a payload that differs. */
int cs_recv(ucp_worker_h w, ukv_rslot *s, int n, int window, const void *check, size_t check_len) {
    unsigned prog;
    int changed;
    for (int i = 0; i < n; i += window) {
        int k = n - i < window ? n - i : window;
        while (ukv_recv_tensors(w, s + i, k, 1000000, &prog, &changed) > 0) {}
        for (int j = 0; j < k; j++) {
            if (s[i + j].state != 5) return -1000 - (int)s[i + j].state;
            if (memcmp(s[i + j].out, check, check_len) != 0) return -1;
        }
    }
    return 0;
}
"""


def _probe_lib() -> Any:
    """This probe's C loops, linked against the compiled helper (made global first for them)."""
    from transport import _native, _ucp_tag

    helper = _ucp_tag.lib()
    if helper is None:
        raise SystemExit("bench.c_stream needs the compiled helper (a C compiler); none could be built")
    ctypes.CDLL(helper._name, mode=ctypes.RTLD_GLOBAL)
    P, i = ctypes.c_void_p, ctypes.c_int
    return _native.load("ucxkv_c_stream", _C_SOURCE, {
        "cs_send": (i, [P, P, P, P, P, P, P, ctypes.c_size_t, i, i]),
        "cs_recv": (i, [P, P, i, i, P, ctypes.c_size_t])}, "bench.c_stream probe")


def _cpu() -> float:
    return time.process_time()


def _receiver(q: Any, go: Any, size: int, n: int, mode: str) -> None:
    import torch

    from transport import Pipe, _ucp_tag
    from transport import _envelope as codec

    p = Pipe.listen(timeout_s=60)
    q.put(p.address)
    p.wait_connected(60)
    buf = torch.empty(size, dtype=torch.uint8)
    p.recv_tensor(timeout=60)  # the sender is up
    seq0 = p._recv_seq
    if mode == "c":
        lib = _probe_lib()
        slots = (_ucp_tag.RecvSlot * n)()
        frames = torch.empty((WINDOW, codec.HEADER_FRAME_SIZE), dtype=torch.uint8)
        keep = []
        for i in range(n):
            got = p._payload_header(buf, seq0 + i)
            assert got is not None, "the tensor would ride inline: use a larger --size"
            keep.append(got[1])
            c = slots[i]
            c.hdr_tag, c.pay_tag = p._tag(p._recv_tag, seq0 + i, False), p._tag(p._recv_tag, seq0 + i, True)
            c.frame, c.cap = frames[i % WINDOW].data_ptr(), codec.HEADER_FRAME_SIZE
            c.expect, c.expect_len = ctypes.cast(ctypes.c_char_p(got[1]), ctypes.c_void_p).value, len(got[1])
            c.out, c.out_len = buf.data_ptr(), size
        check = bytes([7]) * min(size, 4096)
    go.put("ready")
    c0 = _cpu()
    if mode == "c":
        eng = p._engine
        with eng._lock:
            rc = lib.cs_recv(eng._worker_h, slots, n, WINDOW, check, len(check))
        p._recv_seq = seq0 + n
        if rc != 0:
            raise RuntimeError(f"the C receive loop failed: {rc}")
    else:
        done = 0
        while done < n:
            k = min(WINDOW, n - done)
            p.recv_tensors(out=[buf] * k, timeout=60)
            done += k
    cpu = _cpu() - c0
    if not bool((buf == 7).all()):
        raise RuntimeError("the last payload received differs from the one sent")
    q.put(f"receiver ({mode}): {1e6 * cpu / n:.1f} us CPU/message")
    p.send_tensor(None)
    p.recv_tensor(timeout=60)
    p.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1 << 20, help="bytes per tensor (above the inline limit)")
    ap.add_argument("-n", type=int, default=4000, help="tensors")
    ap.add_argument("--tls", default="sm", help="UCX_TLS of both sides")
    ap.add_argument("--send", choices=["c", "pipe"], default="c")
    ap.add_argument("--recv", choices=["c", "pipe"], default="c")
    args = ap.parse_args()
    from bench.perftest import PINNED_UCX_ENV

    os.environ["UCX_TLS"] = args.tls
    for k, v in PINNED_UCX_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    import torch

    ctx = mp.get_context("spawn")
    q, go = ctx.Queue(), ctx.Queue()
    rx = ctx.Process(target=_receiver, args=(q, go, args.size, args.n, args.recv), daemon=True)
    rx.start()
    from transport import Pipe

    p = Pipe.connect(q.get(timeout=120), timeout_s=60)
    t = torch.full((args.size,), 7, dtype=torch.uint8)
    p.send_tensor(None)
    n, seq0 = args.n, p._send_seq
    if args.send == "c":
        lib = _probe_lib()
        hdrs = [p._payload_header_bytes(t.dtype, t.shape, t.nbytes, seq0 + i) for i in range(n)]
        tags_h = (ctypes.c_uint64 * n)(*[p._tag(p._send_tag, seq0 + i, False) for i in range(n)])
        tags_p = (ctypes.c_uint64 * n)(*[p._tag(p._send_tag, seq0 + i, True) for i in range(n)])
        hp = (ctypes.c_char_p * n)(*hdrs)
        lens = (ctypes.c_uint32 * n)(*[len(h) for h in hdrs])
    go.get(timeout=120)  # the receiver is ready
    c0, t0 = _cpu(), time.perf_counter()
    if args.send == "c":
        eng = p._engine
        with eng._lock:
            rc = lib.cs_send(eng._worker_h, p._ep.handle, tags_h, tags_p, hp, lens, t.data_ptr(), t.nbytes, n,
                             WINDOW)
        p._send_seq = seq0 + n
        p.bytes_sent += n * t.nbytes
        if rc != 0:
            raise RuntimeError(f"the C send loop failed: UCS status {rc}")
    else:
        inflight: collections.deque = collections.deque()
        for _ in range(n):
            if len(inflight) >= WINDOW:
                inflight.popleft().wait(60)
            inflight.append(p.send_tensor_async(t))
        while inflight:
            inflight.popleft().wait(60)
    c1, t1 = _cpu(), time.perf_counter()
    print(f"sender ({args.send}): {1e6 * (c1 - c0) / n:.1f} us CPU/message; stream "
          f"{n * args.size / (t1 - t0) / 1e6:.0f} MB/s ({args.size} B x {n}, UCX_TLS={args.tls})")
    print(q.get(timeout=120))
    p.recv_tensor(timeout=60)
    p.send_tensor(None)
    p.close()
    rx.join(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
