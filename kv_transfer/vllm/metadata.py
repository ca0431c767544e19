"""What crosses between the connector's halves: per-step metadata (scheduler -> worker) and the compatibility record.

The compatibility record travels in ``kv_transfer_params`` from prefill to decode;
decode refuses (and recomputes) a request whose record differs from its own in
any of :data:`COMPAT_KEYS`, naming both sides' values. ``protocol`` is the
connector protocol version: bump :data:`CONNECTOR_PROTOCOL` whenever what prefill
stages or what ``kv_transfer_params`` mean changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

__all__ = ["CONNECTOR_PROTOCOL", "COMPAT_KEYS", "SaveSpec", "LoadSpec", "UcxConnectorMetadata",
           "compat_record", "compat_problem"]

#: Version of the prefill -> decode contract (kv_transfer_params and the staged entry format).
CONNECTOR_PROTOCOL = 1

COMPAT_KEYS = ("protocol", "model", "dtype", "num_layers", "num_kv_heads", "head_size", "block_size", "layout")


@dataclass
class SaveSpec:
    """A prefill request whose prompt finished in this step: stage these blocks under this id."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    corrupt: bool = False  # testing only: flip a bit of the staged KV after its checksum


@dataclass
class LoadSpec:
    """A decode request whose prompt KV is fetched from a producer into these local blocks."""

    req_id: str
    remote_request_id: str
    remote_address: str
    token_ids: list[int]
    num_tokens: int  # tokens whose KV the producer holds
    block_ids: list[int]  # local blocks, in order
    skip_blocks: int  # leading blocks already computed locally (prefix cache)
    perturb: bool = False  # testing only: add noise to what was loaded


@dataclass
class UcxConnectorMetadata(KVConnectorMetadata):
    """What the scheduler tells its worker(s) for one step."""

    to_save: list[SaveSpec] = field(default_factory=list)
    to_load: list[LoadSpec] = field(default_factory=list)
    cancel_loads: list[str] = field(default_factory=list)


def compat_record(vllm_config: Any, kv_cache_config: Any) -> dict[str, str]:
    """This instance's compatibility record (all values strings, keys :data:`COMPAT_KEYS`)."""
    spec = None
    try:
        spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
    except Exception:  # noqa: BLE001 - older vLLM: fall back to model config
        pass
    mc = vllm_config.model_config
    try:
        num_layers = mc.get_num_layers(vllm_config.parallel_config)
        kv_heads = mc.get_num_kv_heads(vllm_config.parallel_config)
        head = mc.get_head_size()
    except Exception:  # noqa: BLE001
        num_layers = kv_heads = head = -1
    layout = getattr(kv_cache_config, "kv_cache_layout", None) or "?"
    return {
        "protocol": str(CONNECTOR_PROTOCOL),
        "model": os.path.basename(str(mc.model).rstrip("/")),
        "dtype": str(getattr(spec, "dtype", vllm_config.cache_config.cache_dtype)),
        "num_layers": str(num_layers),
        "num_kv_heads": str(getattr(spec, "num_kv_heads", kv_heads)),
        "head_size": str(getattr(spec, "head_size", head)),
        "block_size": str(getattr(spec, "block_size", vllm_config.cache_config.block_size)),
        "layout": str(layout),
    }


def compat_problem(mine: dict[str, str], remote: Optional[dict[str, Any]]) -> Optional[str]:
    """None when prefill's record ``remote`` matches decode's ``mine``; else what differs, both sides named."""
    if not remote:
        return "the producer sent no compatibility record"
    bad = [k for k in COMPAT_KEYS if str(remote.get(k)) != mine.get(k)]
    if not bad:
        return None
    return "; ".join(f"{k}: prefill={remote.get(k)!r} decode={mine.get(k)!r}" for k in bad)
