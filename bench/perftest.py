"""``ucxkv-perftest``: ucx_perftest-shaped benchmark of the ucxkv tensor Pipe.

Server (waits on ``-p PORT``, serves one client, exits)::

    ucxkv-perftest [-p 13337]

Client::

    ucxkv-perftest HOST -t tensor_bw -s 4K:64M -n 100 -w 10 [-m host[,host]] [--tls tcp]
    ucxkv-perftest --local -t kv_bw --baseline ucx_perftest

``--local`` starts a server subprocess on a free port and runs the client
against it. The client tells the server what to run: the first message of
each test is a :meth:`Pipe.send_message` envelope whose body (a
:class:`transport.MessageCodec` message, magic ``UKVB``) holds the
parameters; the server answers with one describing itself (pid, effective UCX
transports) and, after the test, one with its own findings (``kv_bw``
verification).

Tests:

* ``tensor_lat``: ping-pong of one tensor; one-way latency (half the round trip).
* ``tensor_bw``: the client streams tensors with up to ``-O`` sends in flight,
  the server keeps ``-O`` receives posted and acks once at the end.
* ``kv_bw``: one request's paged KV cache from the client's caches into
  *other* block ids of the server's caches, per iteration; ``--kv-mode gather``
  stages (gather, one tensor, scatter), ``--kv-mode views`` sends one tensor
  per contiguous block run and copies each into place on arrival, ``--kv-mode rma``
  has the client register its caches and the server GET the request's blocks
  one-sidedly straight into its own registered caches (no staging, no receive).
  Checked bit-exact once, after the last iteration.
* ``lookup_lat``: the LookupBuffer round trip. The server process inserts entries of
  SIZE bytes (request id + tokens) into a served ``LookupBuffer`` ahead of the client,
  under back-pressure (capacity: 8 entries, at least 64 KiB: 4096 entries of 8 B); the client times each ``drop_select``
  (query out, matching KV back into its memory) through a ``LookupClient``. Reported
  latency is that whole round trip, not half of it.

Output is ucx_perftest's table (``-v``: its CSV, ``--json``: one object per
size); see docs/bench.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any, Sequence

log = logging.getLogger("bench.perftest")

DEFAULT_PORT = 13337
TESTS = ("tensor_lat", "tensor_bw", "kv_bw", "lookup_lat")
#: ucxx (the first three) and our engine (the TCP segment) set these on import unless present;
#: pin them for every process we compare, baselines included.
PINNED_UCX_ENV = {"UCX_RNDV_THRESH": "8192", "UCX_MAX_RNDV_RAILS": "1", "UCX_MEMTYPE_CACHE": "n",
                  "UCX_TCP_TX_SEG_SIZE": "64K"}
UCX_TEST_FOR = {"tensor_bw": "tag_bw", "kv_bw": "tag_bw", "tensor_lat": "tag_lat", "lookup_lat": "tag_lat"}


# --------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    """The CLI, ucx_perftest's flags first."""
    ap = argparse.ArgumentParser(
        prog="ucxkv-perftest",
        description="ucx_perftest-style benchmark for the ucxkv tensor Pipe (server without HOST).")
    ap.add_argument("host", nargs="?", help="server to connect to; omit to run the server")
    ap.add_argument("-p", "--port", type=int, default=DEFAULT_PORT, help="server port (default %(default)s)")
    ap.add_argument("-t", "--test", choices=TESTS, default="tensor_bw")
    ap.add_argument("-s", "--size", default="8",
                    help="message size(s) in bytes: 8,1K,1M and/or power-of-two ranges 4K:64M (ignored by kv_bw)")
    ap.add_argument("-n", "--iters", type=int, default=None, help="measured iterations (default: by size)")
    ap.add_argument("-w", "--warmup", type=int, default=None, help="warm-up iterations (default: by size)")
    ap.add_argument("-m", "--mem", default="host", help="memory types: send[,recv] each host|cuda")
    ap.add_argument("-O", "--outstanding", type=int, default=8, help="tensor_bw: sends/receives in flight")
    ap.add_argument("-v", "--csv", action="store_true", help="print ucx_perftest's CSV instead of the table")
    ap.add_argument("--json", action="store_true", help="print one JSON object per size")
    ap.add_argument("--local", action="store_true", help="start a server subprocess here and run against it")
    ap.add_argument("--bind", default="0.0.0.0", help="server: interface to listen on")
    ap.add_argument("--tls", default=None, help="set UCX_TLS for every process (ours and baselines)")
    ap.add_argument("--allow-cma", action="store_true",
                    help="set UCXKV_ALLOW_CMA=1 so a shared-memory UCX_TLS keeps cma (as ucx_perftest does)")
    ap.add_argument("--baseline", action="append", default=[],
                    help="compare with: ucx_perftest, pyzmq, gloo, nixl (repeat or comma-separate)")
    ap.add_argument("--plot", metavar="FILE.png", help="bandwidth vs size, one line per implementation")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ap.add_argument("--timeout", type=float, default=120.0, help="per-operation timeout, seconds")
    ap.add_argument("--pin", metavar="SERVER_CPU,CLIENT_CPU", default=None,
                    help="with --local: pin our server and client, and each baseline's two processes, to these two "
                         "CPUs (ucx_perftest with its own -c): two spinning peers never share a core")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run our test and then each baseline this many times, alternating, and summarise the "
                         "per-round ratios (min / median / max): on a noisy machine one pair of runs says little")
    kv = ap.add_argument_group("kv_bw")
    kv.add_argument("--layers", type=int, default=32)
    kv.add_argument("--kv-heads", type=int, default=8)
    kv.add_argument("--head-size", type=int, default=128)
    kv.add_argument("--block-size", type=int, default=16)
    kv.add_argument("--tokens", type=int, default=2048)
    kv.add_argument("--dtype", default="bfloat16")
    kv.add_argument("--layout", choices=["vllm_cpu", "flash_attn"], default="vllm_cpu")
    ap.add_argument("--recv", choices=["into", "alloc"], default=None,
                    help="into: receive into preallocated tensors (recv_tensor(out=...), like ucx_perftest); "
                         "alloc: let every receive allocate (default: into when the Pipe supports it)")
    kv.add_argument("--kv-mode", choices=["layers", "gather", "views", "rma", "stage", "auto"], default="layers",
                    help="gather: stage in one tensor and scatter; views: send block views, copy into place; "
                         "rma: the server GETs the client's registered blocks into its own (compare: ucp_get); "
                         "stage: the connector's kv_mode stage (= gather); auto: what the connector's kv_mode "
                         "auto picks for this UCX_TLS (rma or gather), printed with its reason")
    kv.add_argument("--verify", action="store_true",
                    help="per-block checksums (kv_transfer.integrity) computed on the sender's device after "
                         "the gather, sent along and checked on the receiver's device before the scatter "
                         "(--kv-mode layers and gather), as the connector's verify_kv does")
    ap.add_argument("--log-level", default="WARNING")
    return ap


def default_iters(test: str, size: int) -> tuple[int, int]:
    """(iterations, warm-up) when not given: about 1 GiB (bw) or a fixed count (lat)."""
    if test == "kv_bw":
        return 5, 1
    if test.endswith("lat"):
        n = 10000 if size <= 65536 else max(20, min(10000, (256 << 20) // max(size, 1)))
    else:
        n = max(20, min(10000, (1 << 30) // max(size, 1)))
    return n, max(1, min(100, n // 10))


def _baselines(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for b in args.baseline:
        out += [x.strip() for x in b.split(",") if x.strip()]
    from ._baselines import BASELINES

    for b in out:
        if b not in BASELINES:
            raise SystemExit(f"ucxkv-perftest: unknown baseline {b!r} (choose from {', '.join(BASELINES)})")
    return list(dict.fromkeys(out))


def _resolve_kv_mode(args: argparse.Namespace) -> None:
    """Map the connector's kv_mode names onto bench modes: stage -> gather; auto -> the connector's rule."""
    if args.kv_mode == "auto":
        from kv_transfer._kv_mode import auto_kv_mode

        mode, why = auto_kv_mode(os.environ.get("UCX_TLS", ""))
        print(f"kv-mode {why}", file=sys.stderr, flush=True)
        args.kv_mode = mode
    if args.kv_mode == "stage":
        args.kv_mode = "gather"


def _setup_env(args: argparse.Namespace) -> None:
    """Explicit UCX settings for this process and every child (before ucxx is imported)."""
    if args.tls:
        os.environ["UCX_TLS"] = args.tls
    if args.allow_cma:
        os.environ["UCXKV_ALLOW_CMA"] = "1"
    for k, v in PINNED_UCX_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")


# --------------------------------------------------------------------------- helpers
def _control_codec() -> Any:
    from transport import MessageCodec

    # the bench's own channel: a map of parameters or findings; any bad bytes are a RemoteProtocolError
    return MessageCodec(b"UKVB", 1, dict, what="perftest control message", max_body=1 << 20)


def _send_control(pipe: Any, obj: dict[str, Any]) -> None:
    """Send ``obj`` (parameters or findings) as one envelope with no tensors."""
    pipe.send_message(_control_codec().encode(obj))


def _recv_control(pipe: Any, timeout: float | None = None) -> dict[str, Any]:
    """Receive what :func:`_send_control` sent."""
    body, _ = pipe.recv_message(timeout=timeout, max_tensors=0)
    return _control_codec().decode(body, pipe.peer)


def effective_tls() -> str:
    """The UCX_TLS our engine actually uses in this process (after its sm rewrite)."""
    from transport._engine import get_engine

    return str(get_engine().context.config.get("TLS"))


def _recv_mode(args: argparse.Namespace) -> str:
    """``into`` when the Pipe can receive into an existing tensor (and not overridden), else ``alloc``."""
    import inspect

    from transport import Pipe

    has_out = "out" in inspect.signature(Pipe.recv_tensor).parameters
    if args.recv == "into" and not has_out:
        raise SystemExit("ucxkv-perftest: --recv into needs Pipe.recv_tensor(out=...), which this transport lacks")
    return args.recv or ("into" if has_out else "alloc")


def _devices(mem: str) -> tuple[str, str]:
    parts = [m.strip() for m in mem.split(",") if m.strip()] or ["host"]
    if len(parts) == 1:
        parts.append(parts[0])
    for m in parts:
        if m not in ("host", "cuda"):
            raise SystemExit(f"ucxkv-perftest: memory type must be host or cuda, got {m!r}")
    return tuple("cpu" if m == "host" else "cuda" for m in parts[:2])  # type: ignore[return-value]


# --------------------------------------------------------------------------- kv_bw setup
def kv_spec(cfg: dict[str, Any]) -> dict[str, Any]:
    """Shapes and ids of the kv_bw test, derived identically on both sides."""
    import numpy as np

    nblk = -(-cfg["tokens"] // cfg["block_size"])
    nb = 2 * nblk
    h, bs, d = cfg["kv_heads"], cfg["block_size"], cfg["head_size"]
    shape = (nb, h, bs, 2 * d) if cfg["layout"] == "vllm_cpu" else (2, nb, bs, h, d)
    src_ids = [2 * i for i in range(nblk)]  # never consecutive: one view per block
    perm = np.random.default_rng(7).permutation(nblk)
    dst_ids = [int(2 * p + 1) for p in perm]
    return {"nblk": nblk, "shape": shape, "src_ids": src_ids, "dst_ids": dst_ids}


def _layout(name: str) -> Any:
    from kv_transfer.paged import PagedLayout

    return PagedLayout.vllm_cpu() if name == "vllm_cpu" else PagedLayout.flash_attn()


def _src_layer(cfg: dict[str, Any], shape: Sequence[int], layer: int, device: str) -> Any:
    """Deterministic random bits for source layer ``layer`` (both sides can rebuild it)."""
    import math

    import torch

    dtype = getattr(torch, cfg["dtype"])
    esize = torch.empty(0, dtype=dtype).element_size()
    g = torch.Generator().manual_seed(1234 + layer)
    raw = torch.randint(0, 256, (math.prod(shape) * esize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).view(*shape).to(device)


def kv_request_bytes(cfg: dict[str, Any]) -> int:
    """Bytes of one request's KV (all layers, K and V)."""
    import torch

    esize = torch.empty(0, dtype=getattr(torch, cfg["dtype"])).element_size()
    nblk = -(-cfg["tokens"] // cfg["block_size"])
    return cfg["layers"] * nblk * cfg["block_size"] * cfg["kv_heads"] * cfg["head_size"] * 2 * esize


# --------------------------------------------------------------------------- server
def serve(args: argparse.Namespace, connect_timeout: float = 3600.0) -> int:
    """Wait for one client and run whatever tests it asks for; exit when it says bye."""
    from transport import Pipe, PipeOptions

    pipe = Pipe.listen(args.bind, args.port, options=PipeOptions(timeout_s=args.timeout))
    print(f"Waiting for connection on {pipe.address}...", flush=True)
    try:
        pipe.wait_connected(connect_timeout)
        print(f"Accepted connection from {pipe.peer}", flush=True)
        while True:
            cfg = _recv_control(pipe, timeout=connect_timeout)
            if cfg.get("cmd") == "bye":
                break
            _send_control(pipe, {"pid": os.getpid(), "tls": effective_tls(),
                              "allow_cma": os.environ.get("UCXKV_ALLOW_CMA", "0"),
                              "cpus": sorted(os.sched_getaffinity(0))})
            cfg.setdefault("bind", args.bind)
            report = _serve_one(pipe, cfg)
            _send_control(pipe, report)
    finally:
        pipe.close()
    return 0


def _serve_one(pipe: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    test, dev = cfg["test"], cfg["recv_dev"]
    total = cfg["iters"] + cfg["warmup"]
    if test == "tensor_lat":
        rbuf = torch.empty(cfg["size"], dtype=torch.uint8, device=dev)
        for _ in range(total):
            got = pipe.recv_tensor(out=rbuf) if cfg.get("recv") == "into" else pipe.recv_tensor(device=dev)
            pipe.send_tensor(got)
        return {}
    into = cfg.get("recv") == "into"
    if test == "lookup_lat":
        return _serve_lookup(pipe, cfg)
    if test == "tensor_bw":
        window = max(1, cfg["window"])
        rbuf = torch.empty(cfg["size"], dtype=torch.uint8, device=dev) if into else None
        for count in (cfg["warmup"], cfg["iters"]):
            done = 0
            while done < count:  # one batch of receives posted at a time (the Pipe allows one pending batch)
                k = min(window, count - done)
                if into:
                    pipe.recv_tensors(out=[rbuf] * k)
                else:
                    pipe.recv_tensors_async(k, dev).wait()
                done += k
            pipe.send_tensor(None)  # ack
        return {}
    if test == "kv_bw" and cfg["kv_mode"] == "rma":
        return _serve_kv_rma(pipe, cfg, dev)
    if test == "kv_bw":
        return _serve_kv(pipe, cfg, dev)
    raise ValueError(f"unknown test {test!r}")


def _kv_destination(cfg: dict[str, Any], dev: str) -> tuple[dict[str, Any], Any, list[Any]]:
    """The receiving side's request spec, layout and zeroed per-layer caches for ``kv_bw``."""
    import torch

    spec = kv_spec(cfg)
    dtype = getattr(torch, cfg["dtype"])
    return spec, _layout(cfg["layout"]), [torch.zeros(spec["shape"], dtype=dtype, device=dev)
                                          for _ in range(cfg["layers"])]


def _serve_kv(pipe: Any, cfg: dict[str, Any], dev: str) -> dict[str, Any]:
    import torch

    from kv_transfer.integrity import verify_block_sums
    from kv_transfer.paged import block_views, scatter_blocks, staging_shape

    spec, layout, dst = _kv_destination(cfg, dev)
    dtype = dst[0].dtype
    rss0 = _peak_rss_kib()
    dst_ids = spec["dst_ids"]
    into = cfg.get("recv") == "into"
    staging_in = None
    if into and cfg["kv_mode"] == "gather":
        staging_in = torch.empty(staging_shape(dst, layout, len(dst_ids)), dtype=dtype, device=dev)
    timings: list[float] = []
    layer_in = None
    verify = bool(cfg.get("verify"))
    sums_in = [torch.empty((1, len(dst_ids)), dtype=torch.int64, device=dev) for _ in dst] if verify else []
    sums_all = torch.empty((len(dst), len(dst_ids)), dtype=torch.int64, device=dev) if verify else None
    if cfg["kv_mode"] == "layers":
        one = staging_shape(dst[:1], layout, len(dst_ids))
        layer_in = [torch.empty(one, dtype=dtype, device=dev) for _ in dst]
    for _ in range(cfg["iters"] + cfg["warmup"]):
        if layer_in is not None:
            # one receive per layer posted up front; scatter layer l while l+1.. arrive
            handles = [pipe.recv_tensors_async(out=[buf, *sums_in[i:i + 1]]) for i, buf in enumerate(layer_in)]
            t0 = time.perf_counter()
            for layer, (h, buf) in enumerate(zip(handles, layer_in)):
                h.wait()
                if verify:  # before the layer is written: a mismatch raises, nothing lands
                    verify_block_sums([buf[0]], sums_in[layer], f"kv_bw layer {layer}")
                scatter_blocks([dst[layer]], layout, dst_ids, buf)
        elif cfg["kv_mode"] == "gather":
            if verify and into:
                pipe.recv_tensors(out=[staging_in, sums_all])
                staging, sums = staging_in, sums_all
            elif verify:
                staging, sums = pipe.recv_tensors_async(2, dev).wait()
            else:
                staging = pipe.recv_tensor(out=staging_in) if into else pipe.recv_tensor(device=dev)
            t0 = time.perf_counter()
            if verify:
                verify_block_sums(list(staging.unbind(0)), sums, "kv_bw request")
            scatter_blocks(dst, layout, dst_ids, staging)
        else:
            views = block_views(dst, layout, dst_ids)
            if into:  # straight into the cache blocks: zero copy on the receive side
                pipe.recv_tensors(out=views)
                t0 = time.perf_counter()
            else:
                got = pipe.recv_tensors_async(len(views), dev).wait()
                t0 = time.perf_counter()
                for v, g in zip(views, got):
                    v.copy_(g)
        timings.append(time.perf_counter() - t0)
        pipe.send_tensor(None)  # this request is in place
    rss1 = _peak_rss_kib()  # before verification allocates
    bad = _verify_kv(cfg, spec, layout, dst, dev)  # once, against the sender's deterministic data
    return {"verified": not bad, "bad_layers": bad, "blocks": spec["nblk"],
            "recv_place_s_median": sorted(timings)[len(timings) // 2],
            "server_peak_rss_growth_mib": round((rss1 - rss0) / 1024, 1)}


def _peak_rss_kib() -> int:
    """This process's peak resident set so far, KiB (Linux ``ru_maxrss``)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def rma_pieces(cache: Any, layout: Any, ids: Sequence[int]) -> tuple[Any, Any]:
    """(byte offsets, byte lengths) in ``cache`` of the contiguous runs holding blocks ``ids``."""
    import numpy as np

    from kv_transfer.paged import block_views

    views = block_views([cache], layout, ids)
    esize = cache.element_size()
    off = np.array([(v.storage_offset() - cache.storage_offset()) * esize for v in views], dtype=np.int64)
    return off, np.array([v.numel() * esize for v in views], dtype=np.int64)


def _verify_kv(cfg: dict[str, Any], spec: dict[str, Any], layout: Any, dst: list[Any], dev: str) -> list[int]:
    """Layers of ``dst`` whose destination blocks differ from the sender's deterministic source blocks."""
    from kv_transfer.paged import gather_blocks

    bad = []
    for layer in range(cfg["layers"]):
        src = _src_layer(cfg, spec["shape"], layer, dev)
        want = gather_blocks([src], layout, spec["src_ids"])
        got = gather_blocks([dst[layer]], layout, spec["dst_ids"])
        if not _same_bits(want, got):
            bad.append(layer)
    return bad


def _serve_kv_rma(pipe: Any, cfg: dict[str, Any], dev: str) -> dict[str, Any]:
    """The consumer side of ``--kv-mode rma``: GET the client's registered blocks into our registered caches."""
    import torch

    from transport import register, transfer_many

    spec, layout, dst = _kv_destination(cfg, dev)
    dtype = dst[0].dtype
    rss0 = _peak_rss_kib()
    descs = _recv_control(pipe)["descriptors"]
    if len(descs) != cfg["layers"]:
        raise RuntimeError(f"the client sent {len(descs)} layer descriptors, expected {cfg['layers']}")
    remotes = [pipe.remote_memory(d) for d in descs]
    regs = [register(d, f"kv-dst-layer{i}") for i, d in enumerate(dst)]
    meta = torch.empty(spec["shape"], dtype=dtype, device="meta")  # the client's caches have our shape
    ro, ln = rma_pieces(meta, layout, spec["src_ids"])
    lo, ln2 = rma_pieces(dst[0], layout, spec["dst_ids"])
    if list(ln) != list(ln2):
        raise RuntimeError("source and destination block runs differ in size")
    timings: list[float] = []
    try:
        for _ in range(cfg["iters"] + cfg["warmup"]):
            pipe.recv_tensor()  # go
            t0 = time.perf_counter()
            transfer_many([(rm, reg, lo, ro, ln) for rm, reg in zip(remotes, regs)])  # one round for all layers
            timings.append(time.perf_counter() - t0)
            pipe.send_tensor(None)  # this request is in place
    finally:
        for rm in remotes:
            rm.close()
        for reg in regs:
            reg.close()
    rss1 = _peak_rss_kib()  # before verification allocates
    bad = _verify_kv(cfg, spec, layout, dst, dev)
    return {"verified": not bad, "bad_layers": bad, "blocks": spec["nblk"],
            "get_s_median": sorted(timings)[len(timings) // 2],
            "server_peak_rss_growth_mib": round((rss1 - rss0) / 1024, 1)}


def _serve_lookup(pipe: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    """Insert ``iters + warmup`` entries ahead of the client (back-pressured), serve them."""
    import threading

    import torch

    from kv_transfer import LookupBuffer

    size, total = cfg["size"], cfg["iters"] + cfg["warmup"]
    buf = LookupBuffer(max(8 * (size + 64), 1 << 16), lease_s=600)
    server = buf.serve(cfg.get("bind", "127.0.0.1"), 0)
    errors: list[str] = []

    def producer() -> None:
        try:
            for i in range(total):
                key = torch.full((size,), i % 251, dtype=torch.uint8)
                buf.insert(torch.tensor([i], dtype=torch.int64), None, key, None, None,
                           request_id=f"r{i}", timeout=120)
        except Exception as exc:  # noqa: BLE001 - reported to the client
            errors.append(f"{type(exc).__name__}: {exc}")

    th = threading.Thread(target=producer, daemon=True)
    th.start()
    _send_control(pipe, {"lookup_address": server.address})
    _await_lookup_client(server, total, errors)
    pipe.recv_tensor(timeout=3600)  # the client is done
    th.join(10)
    out = {"served": server.served, "errors": errors, "bytes_left": buf.bytes_used}
    server.close()
    buf.close()
    return out


def _await_lookup_client(server: Any, total: int, errors: list[str], limit_s: float = 3600.0) -> None:
    """Return once ``server`` served ``total`` answers, the client left (or never came within 60 s), or the
    producer failed: polled, so that no harness thread sleeps on the worker during the timed loop.

    A thread asleep on the worker's event fd (this one, in ``recv_tensor``) wakes at every lookup message
    (measured: 8973 wake-ups in 10102 requests) and takes the GIL from the handler: a cost of this harness,
    which ``tensor_lat`` does not pay, not of the lookup path (docs/bench.md).
    """
    start = time.monotonic()
    seen = False
    while not errors and server.served < total and time.monotonic() - start < limit_s:
        n = server.num_consumers
        if n == 0 and (seen or time.monotonic() - start > 60):
            return  # the client left (its "done", or a dead pipe, says how) or never connected
        seen = seen or n > 0
        time.sleep(0.05)


def _same_bits(a: Any, b: Any) -> bool:
    """Bit-for-bit equality (NaN payloads included)."""
    import torch

    m = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(m), b.view(m))


# --------------------------------------------------------------------------- client
def _client_one(pipe: Any, cfg: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Run one test against the server; return (Result, server info + report)."""
    import torch

    from ._report import compute_rows

    _send_control(pipe, cfg)
    info = _recv_control(pipe)
    test, size, dev = cfg["test"], cfg["size"], cfg["send_dev"]
    n, w = cfg["iters"], cfg["warmup"]
    if test == "tensor_lat":
        t = torch.ones(size, dtype=torch.uint8, device=dev)
        rbuf = torch.empty(size, dtype=torch.uint8, device=dev)
        into = cfg.get("recv") == "into"
        durs: list[float] = []
        for i in range(w + n):
            t0 = time.perf_counter()
            pipe.send_tensor(t)
            if into:
                pipe.recv_tensor(out=rbuf)
            else:
                pipe.recv_tensor(device=dev)
            if i >= w:
                durs.append(time.perf_counter() - t0)
        ends = list(_cumsum(durs))
        res = compute_rows(test, size, ends, durs_s=durs, one_way_div=2.0)
    elif test == "tensor_bw":
        t = torch.ones(size, dtype=torch.uint8, device=dev)
        window = max(1, cfg["window"])
        ends, elapsed = [], 0.0
        for count, timed in ((w, False), (n, True)):
            q: collections.deque = collections.deque()
            e: list[float] = []
            t0 = time.perf_counter()
            for _ in range(count):
                if len(q) >= window:
                    q.popleft().wait()
                    e.append(time.perf_counter() - t0)
                q.append(pipe.send_tensor_async(t))
            while q:
                q.popleft().wait()
                e.append(time.perf_counter() - t0)
            pipe.recv_tensor()  # ack: the server has everything
            if timed:
                ends, elapsed = e, time.perf_counter() - t0
        res = compute_rows(test, size, ends, elapsed_s=elapsed)
    elif test == "kv_bw":
        res = _client_kv(pipe, cfg)
    elif test == "lookup_lat":
        res = _client_lookup(pipe, cfg)
    else:
        raise ValueError(test)
    report = _recv_control(pipe)
    res.info.update({"server_tls": info.get("tls"), "client_tls": effective_tls(),
                     "server_cpus": info.get("cpus"), "client_cpus": sorted(os.sched_getaffinity(0))})
    res.info.update({k: v for k, v in report.items()})
    return res, info


def _client_lookup(pipe: Any, cfg: dict[str, Any]) -> Any:
    import torch

    from kv_transfer import LookupClient
    from transport import PipeOptions

    from ._report import compute_rows

    host = pipe.address.rsplit(":", 1)[0]
    addr = _recv_control(pipe)["lookup_address"]
    addr = f"{host}:{addr.rsplit(':', 1)[1]}"  # the server bound where we reached it
    n, w = cfg["iters"], cfg["warmup"]
    durs: list[float] = []
    bad = 0
    with LookupClient(addr, options=PipeOptions(timeout_s=60, device=cfg["send_dev"])) as client:
        for i in range(w + n):
            q = torch.tensor([i], dtype=torch.int64)
            t0 = time.perf_counter()
            got = client.drop_select(q, None, request_id=f"r{i}", wait_s=60.0)
            dt = time.perf_counter() - t0
            key = got[2]
            if key is None or key.numel() != cfg["size"] or (key.numel() and int(key[0]) != i % 251):
                bad += 1
            if i >= w:
                durs.append(dt)
    pipe.send_tensor(None)
    res = compute_rows("lookup_lat", cfg["size"], list(_cumsum(durs)), durs_s=durs)
    res.info["lookup_wrong_answers"] = bad
    return res


def _cumsum(xs: Sequence[float]) -> Any:
    s = 0.0
    for x in xs:
        s += x
        yield s


def _client_kv(pipe: Any, cfg: dict[str, Any]) -> Any:
    import torch

    from kv_transfer.integrity import block_sums
    from kv_transfer.paged import block_views, gather_blocks, staging_shape

    from ._report import compute_rows

    spec = kv_spec(cfg)
    verify = bool(cfg.get("verify"))
    layout = _layout(cfg["layout"])
    dev = cfg["send_dev"]
    src = [_src_layer(cfg, spec["shape"], layer, dev) for layer in range(cfg["layers"])]
    rss0 = _peak_rss_kib()
    ids = spec["src_ids"]
    staging = None
    layer_out = None
    if cfg["kv_mode"] == "gather":
        staging = torch.empty(staging_shape(src, layout, len(ids)), dtype=src[0].dtype, device=dev)
    elif cfg["kv_mode"] == "layers":
        one = staging_shape(src[:1], layout, len(ids))
        layer_out = [torch.empty(one, dtype=src[0].dtype, device=dev) for _ in src]
    durs: list[float] = []
    regs: list[Any] = []
    if cfg["kv_mode"] == "rma":
        from transport import register

        regs = [register(s, f"kv-src-layer{i}") for i, s in enumerate(src)]
        _send_control(pipe, {"descriptors": [r.descriptor().to_bytes() for r in regs]})
    for i in range(cfg["warmup"] + cfg["iters"]):
        t0 = time.perf_counter()
        if regs:
            pipe.send_tensor(None)  # go: the server GETs this request's blocks from our caches
        elif layer_out is not None:
            # gather layer l+1 while layer l is on the wire (the engine progresses it in the background)
            handles = []
            for layer, buf in enumerate(layer_out):
                gather_blocks([src[layer]], layout, ids, out=buf)
                # with --verify the layer's checksum follows it, computed on (and sent from) its device
                handles.append(pipe.send_tensors_async([buf, block_sums(buf)]) if verify
                               else pipe.send_tensor_async(buf))
            for h in handles:
                h.wait()
        elif staging is not None:
            gather_blocks(src, layout, ids, out=staging)
            if verify:
                pipe.send_tensors([staging, block_sums(staging)])
            else:
                pipe.send_tensor(staging)
        else:
            pipe.send_tensors(block_views(src, layout, ids))
        pipe.recv_tensor()  # the request's blocks are in the server's cache
        if i >= cfg["warmup"]:
            durs.append(time.perf_counter() - t0)
    for r in regs:
        r.close()  # the server's last GET completed before its ack
    res = compute_rows("kv_bw", cfg["size"], list(_cumsum(durs)), durs_s=durs)
    pieces = len(block_views(src, layout, ids))
    res.info.update({"kv_pieces": pieces, "kv_mode": cfg["kv_mode"], "layout": cfg["layout"], "verify": verify,
                     "client_peak_rss_growth_mib": round((_peak_rss_kib() - rss0) / 1024, 1)})
    return res


def _spawn_local_server(args: argparse.Namespace) -> tuple[subprocess.Popen, int]:
    from ._baselines import free_port

    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "bench.perftest", "-p", str(port), "--bind", "127.0.0.1",
           "--timeout", str(args.timeout), "--log-level", args.log_level, "--_connect-timeout", "120"]
    if args.pin:
        cmd += ["--_cpu", str(args.pin[0])]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    return proc, port


def run_client(args: argparse.Namespace) -> int:
    """Client side: run the tests and the baselines ``--rounds`` times, print the report."""
    from . import _report as R

    out = sys.stdout
    test = args.test
    baselines = _baselines(args)
    send_dev, recv_dev = _devices(args.mem)
    kv_keys = ("layers", "kv_heads", "head_size", "block_size", "tokens", "dtype", "layout", "kv_mode", "verify")
    if test == "kv_bw" and args.verify and args.kv_mode not in ("layers", "gather"):
        raise SystemExit("--verify needs --kv-mode layers or gather")
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    if test == "kv_bw":
        sizes = [kv_request_bytes({k: getattr(args, k) for k in kv_keys})]
    else:
        sizes = R.parse_sizes(args.size)

    server = None
    host = args.host
    if args.local:
        server, port = _spawn_local_server(args)
        host = "127.0.0.1"
    else:
        port = args.port
    from transport import Pipe, PipeOptions

    is_lat = test.endswith("lat")
    rounds: list[tuple[list[R.Result], dict[str, dict[int, R.Result | str]]]] = []
    if args.csv:
        print(R.CSV_HEADER, file=out, flush=True)
    try:
        pipe = Pipe.connect(f"{host}:{port}", options=PipeOptions(timeout_s=args.timeout))
        try:
            for rnd in range(args.rounds):
                if args.rounds > 1 and not (args.csv or args.json):
                    print(f"\n=== round {rnd + 1} of {args.rounds}", file=out, flush=True)
                ours = _measure(pipe, args, sizes, (send_dev, recv_dev), kv_keys, out)
                last = rnd == args.rounds - 1
                if last:
                    _send_control(pipe, {"cmd": "bye"})
                    pipe.close()
                    _reap_server(server)
                    server = None
                # the last round's baselines run with our server gone; an earlier round's while it idles
                # connected (docs/bench.md, "Rounds")
                base = _run_baselines(args, baselines, ours, (send_dev, recv_dev))
                rounds.append((ours, base))
                _report_round(args, ours, base, out)
        finally:
            pipe.close()
    finally:
        _reap_server(server)

    ours, base = rounds[-1]
    if args.rounds > 1 and baselines:
        R.print_round_summary([(o, b) for o, b in rounds], is_lat, sys.stderr if (args.csv or args.json) else out)
    if args.json:
        for i, r in enumerate(ours):
            extra = {"rounds": [json.loads(R.json_line(o[i], {b: per[o[i].size] for b, per in bs.items()}))
                                for o, bs in rounds]} if args.rounds > 1 else None
            print(R.json_line(r, {b: per[r.size] for b, per in base.items()}, extra), file=out, flush=True)
    if args.plot:
        series: dict[str, list[R.Result]] = {"ucxkv": ours}
        for b in base:
            rs = [v for v in base[b].values() if isinstance(v, R.Result)]
            if rs:
                series[b] = rs
        R.plot(series, args.plot, f"{test} ({os.environ.get('UCX_TLS', 'UCX_TLS unset')})")
    if test == "kv_bw" and not all(r.info.get("verified") for o, _ in rounds for r in o):
        return 2
    return 0


def _reap_server(server: subprocess.Popen | None) -> None:
    """Wait for the ``--local`` server to exit (it does after "bye" or a closed pipe), else kill it."""
    if server is None:
        return
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _measure(pipe: Any, args: argparse.Namespace, sizes: list[int], devs: tuple[str, str],
             kv_keys: tuple[str, ...], out: Any) -> list[Any]:
    """One round of our test over every size through ``pipe``; prints each size's table (or CSV row)."""
    from . import _report as R

    test = args.test
    progress = R.Progress(len(sizes), enabled=not args.no_progress)
    ours = []
    for size in sizes:
        n, w = default_iters(test, size)
        n = args.iters if args.iters is not None else n
        w = args.warmup if args.warmup is not None else w
        cfg = {"cmd": "run", "test": test, "size": size, "iters": n, "warmup": w,
               "send_dev": devs[0], "recv_dev": devs[1], "window": args.outstanding,
               "recv": _recv_mode(args)}
        if test == "kv_bw":
            cfg.update({k: getattr(args, k) for k in kv_keys})
        res, _ = _client_one(pipe, cfg)
        res.info.update({"iters": n, "warmup": w, "recv": cfg["recv"]})
        ours.append(res)
        if args.csv:
            print(res.final.csv(), file=out, flush=True)  # type: ignore[union-attr]
        elif not args.json:
            _print_header(res, args, out)
            R.print_table(res, test.endswith("lat"), out)
            if test == "kv_bw":
                ok = "OK (bit-exact)" if res.info.get("verified") else f"FAILED layers {res.info.get('bad_layers')}"
                print(f"Verify: {ok}; {res.info.get('blocks')} blocks x {args.layers} layers, "
                      f"{res.info.get('kv_pieces')} block pieces, mode {args.kv_mode}", file=out, flush=True)
        progress.step(R.human_size(size))
    return ours


def _run_baselines(args: argparse.Namespace, baselines: list[str], ours: list[Any], devs: tuple[str, str]
                   ) -> dict[str, dict[int, Any]]:
    """Each baseline at each of ``ours``' sizes, iterations and warm-up: name -> size -> Result, or why not."""
    from . import _baselines as B

    test = args.test
    send_dev, recv_dev = devs
    base_results: dict[str, dict[int, Any]] = {}
    env = dict(os.environ)
    for b in baselines:
        if b == "ucx_perftest":
            mem = None if args.mem in ("host", "host,host") else args.mem
            ucx_test = "ucp_get" if test == "kv_bw" and args.kv_mode == "rma" else UCX_TEST_FOR[test]
            window = args.outstanding if test == "tensor_bw" else None
            for name, benv in ucx_perftest_runs(env, ours[0].info):
                per: dict[int, Any] = {}
                try:
                    for r in ours:
                        per[r.size] = B.run_ucx_perftest(ucx_test, r.size, r.info["iters"], r.info["warmup"],
                                                         benv, mem=mem, outstanding=window, cpus=args.pin)
                except Exception as exc:  # noqa: BLE001 - a failed baseline is reported, not fatal
                    log.warning("baseline %s failed: %s", name, exc)
                    for r in ours:
                        per.setdefault(r.size, f"failed: {exc}")
                base_results[name] = per
            continue
        per = {}
        try:
            if b in ("pyzmq", "gloo"):
                if send_dev != "cpu" or recv_dev != "cpu":
                    raise RuntimeError(f"{b} baseline runs on host memory only")
                fn = B.run_pyzmq if b == "pyzmq" else B.run_gloo
                n0, w0 = ours[0].info["iters"], ours[0].info["warmup"]
                for r in fn("tag_lat" if test.endswith("lat") else "tag_bw", [r.size for r in ours], n0, w0, env,
                            cpus=args.pin):
                    r.test = test
                    per[r.size] = r
            elif test == "kv_bw" and send_dev == "cpu" and recv_dev == "cpu" and B.nixl_available():
                from ._nixl import run_nixl_kv

                kcfg = {k: getattr(args, k) for k in ("layers", "kv_heads", "head_size", "block_size", "tokens",
                                                      "dtype", "layout", "kv_mode", "verify")}
                for r in ours:
                    per[r.size] = run_nixl_kv(dict(kcfg, size=r.size, cpus=args.pin), r.info["iters"],
                                              r.info["warmup"])
            else:
                for r in ours:
                    per[r.size] = B.nixl_skip_reason(test)
        except Exception as exc:  # noqa: BLE001 - a failed baseline is reported, not fatal
            log.warning("baseline %s failed: %s", b, exc)
            for r in ours:
                per.setdefault(r.size, f"failed: {exc}")
        base_results[b] = per
    return base_results


def _report_round(args: argparse.Namespace, ours: list[Any], base: dict[str, dict[int, Any]], out: Any) -> None:
    """One round's comparison block (ucxkv against each baseline, per size)."""
    from . import _report as R

    if not base:
        return
    test = args.test
    is_lat = test.endswith("lat")
    cmp_out = sys.stderr if (args.csv or args.json) else out
    if not (args.csv or args.json):
        what = ("latency, lower is better; ucxkv = LookupBuffer round trip, baselines one-way"
                if test == "lookup_lat" else "one-way latency, lower is better" if is_lat else "overall bandwidth")
        print(f"\nComparison ({what}; "
              f"ucxkv TLS client={ours[0].info.get('client_tls')} server={ours[0].info.get('server_tls')}; "
              f"asked UCX_TLS={os.environ.get('UCX_TLS', '(unset)')}; each baseline's UCX_TLS in brackets)",
              file=cmp_out)
    for r in ours:
        R.print_comparison(r, {b: per[r.size] for b, per in base.items()}, is_lat, cmp_out)


def ucx_perftest_runs(env: dict[str, str], info: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
    """The ucx_perftest baselines to run: (name, environment) pairs, the like-for-like one first.

    ``ucx_perftest`` runs with the transports our processes really use (``info``'s
    ``client_tls``, after the engine's rewrite of a shared-memory-only ``UCX_TLS`` to
    ``posix,sysv,self``), so the ratio compares the Pipe with UCX under the same
    settings. When that differs from the ``UCX_TLS`` asked for (``sm`` keeps cma in
    ucx_perftest: one copy instead of two), a second baseline named
    ``ucx_perftest(<asked>)`` runs with the asked value, so both figures are shown.
    """
    asked = env.get("UCX_TLS", "")
    ours = info.get("client_tls") or ""
    if not ours or ours == asked or info.get("server_tls", ours) != ours:
        return [("ucx_perftest", env)]
    return [("ucx_perftest", dict(env, UCX_TLS=ours)), (f"ucx_perftest({asked or 'all'})", env)]


def _print_header(res: Any, args: argparse.Namespace, out: Any) -> None:
    from ._report import header_box

    rma = res.test == "kv_bw" and args.kv_mode == "rma"
    lines = [("API", "ucxkv RemoteMemory.get (ucp_get_nbx on registered caches)" if rma
              else "ucxkv Pipe (ucxx tag send/recv + ZeroMQ control)"),
             ("Test", {"tensor_lat": "tensor ping-pong latency", "tensor_bw": "tensor streaming bandwidth",
                       "kv_bw": "paged KV request bandwidth",
                       "lookup_lat": "LookupBuffer drop_select round trip"}[res.test]),
             ("Data layout", f"{args.kv_mode} ({args.layout}, {res.info.get('kv_pieces')} pieces)"
              if res.test == "kv_bw" else "contiguous tensor"),
             ("Send memory", args.mem.split(",")[0]),
             ("Recv memory", args.mem.split(",")[-1]),
             ("Message size", str(res.size)),
             ("Receive", f"{res.info.get('recv')} ({'preallocated out=' if res.info.get('recv') == 'into' else 'allocating'})"),
             ("Window size", str(args.outstanding if res.test == "tensor_bw" else 1)),
             ("Transports", f"client {res.info.get('client_tls')} | server {res.info.get('server_tls')}")]
    header_box(lines, out)


def _parse_pin(ap: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[int, int] | None:
    """``--pin S,C`` as (server CPU, client CPU): two different CPUs this process may run on, with ``--local``."""
    if args.pin is None:
        return None
    try:
        cpus = tuple(int(x) for x in args.pin.split(","))
    except ValueError:
        ap.error(f"--pin wants two CPU numbers, SERVER,CLIENT; got {args.pin!r}")
    allowed = sorted(os.sched_getaffinity(0))
    if len(cpus) != 2 or cpus[0] == cpus[1] or not set(cpus) <= set(allowed):
        ap.error(f"--pin wants two different CPUs of this process's {allowed}, SERVER,CLIENT; got {args.pin!r}")
    if not args.local:
        ap.error("--pin needs --local (it pins the server it starts)")
    return cpus[0], cpus[1]


# --------------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ucxkv-perftest``; returns the exit status."""
    ap = build_parser()
    ap.add_argument("--_connect-timeout", dest="connect_timeout", type=float, default=3600.0,
                    help=argparse.SUPPRESS)
    ap.add_argument("--_cpu", dest="cpu", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(list(argv) if argv is not None else None)
    args.pin = _parse_pin(ap, args)
    # before any thread exists: a thread takes its creator's CPUs (our client's; the server's from --_cpu)
    if args.cpu is not None or args.pin:
        os.sched_setaffinity(0, {args.cpu if args.cpu is not None else args.pin[1]})
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    _setup_env(args)
    _resolve_kv_mode(args)
    if args.host is None and not args.local:
        return serve(args, args.connect_timeout)
    return run_client(args)


if __name__ == "__main__":
    sys.exit(main())
