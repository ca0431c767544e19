"""NIXL baseline for ``kv_bw``: a one-sided READ of the same blocks, NIXL's UCX backend.

Two processes, as vLLM's NixlConnector works: the *target* registers its paged
caches and publishes its agent metadata and one descriptor per block; the
*initiator* (decode's role) registers its own caches and READs the target's
blocks into its own block ids, polling until the transfer is ``DONE``. The data
is :func:`bench.perftest._src_layer`'s, so the result is checked bit-exact.
Needs ``nixl-cu12`` (``pip install --no-deps nixl-cu12 nixl`` beside a CPU torch).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
import traceback
from typing import Any

from ._report import Result, compute_rows

log = logging.getLogger(__name__)


def _block_descs(caches: list[Any], ids: list[int]) -> list[tuple[int, int, int]]:
    out = []
    for c in caches:
        nbytes = c[0].numel() * c.element_size()
        for b in ids:
            out.append((c[b].data_ptr(), nbytes, 0))
    return out


def _target(cfg: dict[str, Any], q_out: Any, q_in: Any) -> None:
    if cfg.get("cpus"):
        os.sched_setaffinity(0, {cfg["cpus"][0]})  # --pin: each side on its own CPU
    try:
        from nixl_cu12._api import nixl_agent, nixl_agent_config

        from .perftest import _src_layer, kv_spec

        spec = kv_spec(cfg)
        src = [_src_layer(cfg, spec["shape"], layer, "cpu") for layer in range(cfg["layers"])]
        agent = nixl_agent("ucxkv-bench-target", nixl_agent_config(backends=["UCX"]))
        agent.register_memory(src)
        q_out.put(("meta", agent.get_agent_metadata(), _block_descs(src, spec["src_ids"])))
        q_in.get(timeout=600)  # the initiator is done
        q_out.put(("ok",))
    except BaseException as exc:  # noqa: BLE001
        q_out.put(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))


def _initiator(cfg: dict[str, Any], iters: int, warmup: int, q_out: Any, q_tgt: Any, q_tgt_in: Any) -> None:
    if cfg.get("cpus"):
        os.sched_setaffinity(0, {cfg["cpus"][1]})  # --pin: each side on its own CPU
    try:
        import torch
        from nixl_cu12._api import nixl_agent, nixl_agent_config

        from kv_transfer.paged import gather_blocks

        from .perftest import _layout, _same_bits, _src_layer, kv_spec

        spec = kv_spec(cfg)
        dtype = getattr(torch, cfg["dtype"])
        dst = [torch.zeros(spec["shape"], dtype=dtype) for _ in range(cfg["layers"])]
        agent = nixl_agent("ucxkv-bench-initiator", nixl_agent_config(backends=["UCX"]))
        agent.register_memory(dst)
        msg = q_tgt.get(timeout=300)
        if msg[0] != "meta":
            raise RuntimeError(f"NIXL target failed: {msg[1].splitlines()[0]}")
        peer = agent.add_remote_agent(msg[1])
        remote = agent.get_xfer_descs(msg[2], "DRAM")
        local = agent.get_xfer_descs(_block_descs(dst, spec["dst_ids"]), "DRAM")
        durs = []
        for i in range(warmup + iters):
            t0 = time.perf_counter()
            h = agent.initialize_xfer("READ", local, remote, peer)
            state = agent.transfer(h)
            deadline = time.monotonic() + 120
            while state not in ("DONE", "ERR"):
                if time.monotonic() > deadline:
                    raise TimeoutError("NIXL READ did not finish within 120 s")
                state = agent.check_xfer_state(h)
            if state == "ERR":
                raise RuntimeError("NIXL READ failed")
            agent.release_xfer_handle(h)
            if i >= warmup:
                durs.append(time.perf_counter() - t0)
        layout = _layout(cfg["layout"])
        ok = all(
            _same_bits(gather_blocks([_src_layer(cfg, spec["shape"], layer, "cpu")], layout, spec["src_ids"]),
                       gather_blocks([dst[layer]], layout, spec["dst_ids"]))
            for layer in range(cfg["layers"]))
        q_tgt_in.put("done")
        q_out.put(("ok", durs, ok, len(msg[2])))
    except BaseException as exc:  # noqa: BLE001
        q_tgt_in.put("done")
        q_out.put(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))


def run_nixl_kv(cfg: dict[str, Any], iters: int, warmup: int, timeout_s: float = 600.0) -> Result:
    """READ one request's blocks ``warmup + iters`` times; a ``Result`` like ours (bit-exact checked)."""
    ctx = mp.get_context("spawn")
    q_tgt, q_tgt_in, q_init = ctx.Queue(), ctx.Queue(), ctx.Queue()
    tgt = ctx.Process(target=_target, args=(cfg, q_tgt, q_tgt_in), daemon=True)
    ini = ctx.Process(target=_initiator, args=(cfg, iters, warmup, q_init, q_tgt, q_tgt_in), daemon=True)
    tgt.start()
    ini.start()
    try:
        msg = q_init.get(timeout=timeout_s)
        if msg[0] != "ok":
            log.debug("NIXL initiator traceback:\n%s", msg[2])
            raise RuntimeError(f"NIXL initiator: {msg[1].splitlines()[0]}")
        _, durs, ok, pieces = msg
        if not ok:
            raise RuntimeError("NIXL READ delivered wrong bytes")
        ends, t = [], 0.0
        for d in durs:
            t += d
            ends.append(t)
        res = compute_rows("kv_bw", cfg["size"], ends, durs_s=durs)
        res.impl = "nixl"
        res.info.update({"kv_pieces": pieces, "verified": ok})
        return res
    finally:
        for p in (ini, tgt):
            p.join(10)
            if p.is_alive():
                p.kill()
