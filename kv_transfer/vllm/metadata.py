"""What crosses between the connector's halves: per-step metadata (scheduler -> worker) and the compatibility record.

The compatibility record travels in ``kv_transfer_params`` from prefill to decode;
decode refuses (and recomputes) a request whose record differs from its own in
any of :data:`COMPAT_KEYS`, or whose tensor-parallel size cannot pair with its
own (:func:`kv_transfer.tp_mapping.check_tp_pair`), naming both sides' values.
``num_kv_heads`` is the model's *total* KV heads (not one rank's shard), so
instances of different TP sizes compare equal. ``protocol`` is the connector
protocol version: bump :data:`CONNECTOR_PROTOCOL` whenever what prefill stages
or what ``kv_transfer_params`` mean changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from ..tp_mapping import check_tp_pair
from .groups import KVGroup, describe_groups

__all__ = ["CONNECTOR_PROTOCOL", "COMPAT_KEYS", "SaveSpec", "LoadSpec", "RenewSpec", "UcxConnectorMetadata",
           "compat_record", "compat_problem"]

#: Version of the prefill -> decode contract (kv_transfer_params and the staged entry format).
#: 2: one KV server per worker rank (remote_port is the engine's base port), total KV heads, tp_size.
#: 3: kv_mode ("stage" | "rma": the rank serves leased blocks over the kvrma service) and lease_s.
#: 4: KV cache groups (hybrid models): one entry per transferred group, ``kv_groups`` in the record.
#: 5: ``retain_kv`` also in kv_mode rma (decode renews the lease while it answers and acknowledges it).
CONNECTOR_PROTOCOL = 5

COMPAT_KEYS = ("protocol", "model", "dtype", "num_layers", "num_kv_heads", "head_size", "block_size", "layout",
               "kv_groups")


@dataclass
class SaveSpec:
    """A prefill request whose prompt finished in this step: stage these blocks under this id."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]  # of the first KV cache group the connector moves (the only one without hybrid models)
    corrupt: bool = False  # testing only: flip a bit of the staged KV after its checksum
    more_groups: list[list[int]] = field(default_factory=list)  # hybrid models: the other groups' blocks, in order

    def groups(self) -> list[list[int]]:
        """Block ids to stage, one list per transferred KV cache group (see :mod:`.groups`)."""
        return [self.block_ids, *self.more_groups]


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
    remote_tp_size: int = 1  # prefill's TP size: remote_address's port is its rank 0's, rank p is port + p
    total_kv_heads: int = 0  # the model's KV heads (0: unknown, read whole shards from the same rank)
    perturb_rank: Optional[int] = None  # testing only: perturb on this decode TP rank only
    kv_mode: str = "stage"  # how prefill holds the KV: staged entries, or leased blocks read in place ("rma")
    retain: bool = False  # prefill keeps the entry after this fetch until acknowledged (decode failover)
    more_groups: list[tuple[list[int], int]] = field(default_factory=list)  # hybrid: (block_ids, skip_blocks) per other group

    def groups(self) -> list[tuple[list[int], int]]:
        """(local block ids, leading blocks not to write) per transferred KV cache group (see :mod:`.groups`)."""
        return [(self.block_ids, self.skip_blocks), *self.more_groups]
    stall_after_claim_s: float = 0.0  # testing only (rma): a slow decode, holding the claimed lease, before its GETs


@dataclass
class RenewSpec:
    """Where prefill holds a decode request's KV (read as in LoadSpec): rma leases to extend while the
    request waits for blocks or (retained) is answered; retained KV to acknowledge."""

    remote_request_id: str
    remote_address: str
    remote_tp_size: int = 1
    total_kv_heads: int = 0
    kv_mode: str = "stage"  # how prefill holds it: an acknowledgement goes over that mode's wire


@dataclass
class UcxConnectorMetadata(KVConnectorMetadata):
    """What the scheduler tells its worker(s) for one step."""

    to_save: list[SaveSpec] = field(default_factory=list)
    to_load: list[LoadSpec] = field(default_factory=list)
    cancel_loads: list[str] = field(default_factory=list)
    release_leases: list[str] = field(default_factory=list)  # rma producer: no reader will come, free now
    renew_leases: list[RenewSpec] = field(default_factory=list)  # rma consumer: still coming, keep them
    ack_loads: list[RenewSpec] = field(default_factory=list)  # consumer: answered, prefill may drop retained KV


def compat_record(vllm_config: Any, kv_cache_config: Any, groups: Sequence[KVGroup] = ()) -> dict[str, str]:
    """This instance's compatibility record (all values strings, keys :data:`COMPAT_KEYS`).

    ``kv_groups`` states the transferred KV cache groups (kind and layer count each, see
    :func:`~kv_transfer.vllm.groups.describe_groups`): a hybrid prefill and a decode with
    its hybrid allocator off (one full-attention group) do not pair.
    """
    spec = None
    try:
        spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
    except Exception:  # noqa: BLE001 - older vLLM: fall back to model config
        pass
    mc = vllm_config.model_config
    try:
        num_layers = mc.get_num_layers(vllm_config.parallel_config)
        kv_heads = mc.get_total_num_kv_heads()
        head = mc.get_head_size()
    except Exception:  # noqa: BLE001
        num_layers = kv_heads = head = -1
    layout = getattr(kv_cache_config, "kv_cache_layout", None) or "?"
    return {
        "protocol": str(CONNECTOR_PROTOCOL),
        "model": os.path.basename(str(mc.model).rstrip("/")),
        "dtype": str(getattr(spec, "dtype", vllm_config.cache_config.cache_dtype)),
        "num_layers": str(num_layers),
        "num_kv_heads": str(kv_heads),  # total, not this rank's shard (spec.num_kv_heads)
        "head_size": str(getattr(spec, "head_size", head)),
        "block_size": str(getattr(spec, "block_size", vllm_config.cache_config.block_size)),
        "layout": str(layout),
        "kv_groups": describe_groups(groups) if groups else "full/*",
        "tp_size": str(int(getattr(vllm_config.parallel_config, "tensor_parallel_size", 1) or 1)),
    }


def compat_problem(mine: dict[str, str], remote: Optional[dict[str, Any]]) -> Optional[str]:
    """None when prefill's record ``remote`` matches decode's ``mine``; else what differs, both sides named."""
    if not remote:
        return "the producer sent no compatibility record"
    bad = [k for k in COMPAT_KEYS if str(remote.get(k)) != mine.get(k)]
    if bad:
        return "; ".join(f"{k}: prefill={remote.get(k)!r} decode={mine.get(k)!r}" for k in bad)
    if str(remote.get("tp_size", "1")) == mine.get("tp_size", "1"):
        return None  # same TP size: rank r reads rank r, whatever the heads
    try:
        check_tp_pair(int(remote.get("tp_size", 1)), int(mine.get("tp_size", 1)), int(mine["num_kv_heads"]))
    except (ValueError, TypeError) as exc:  # ParallelMismatchError is a ValueError
        return (f"tp_size: prefill={remote.get('tp_size')!r} decode={mine.get('tp_size')!r} "
                f"num_kv_heads={mine.get('num_kv_heads')!r}: {exc}")
    return None
