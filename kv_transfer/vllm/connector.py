"""``UcxConnector``: the class vLLM instantiates; builds the scheduler or the worker half by role and delegates.

How a request moves (decode pulls; prefill stages):

1. The proxy sends the prompt to prefill with ``kv_transfer_params =
   {"do_remote_decode": true}`` and ``max_tokens=1``.
2. Prefill's scheduler (:mod:`.scheduler`) tells its worker (:mod:`.metadata`)
   which requests finish their prompt in this step. After the forward, the
   worker (:mod:`.worker`) gathers each such request's blocks (all layers) into
   one staging tensor and inserts it into its :class:`~kv_transfer.LookupBuffer`,
   served on ``kv_host:kv_port``, keyed by the request id *and* its token ids,
   under a lease. The blocks go back to vLLM right away: prefill's block
   lifetime never depends on decode.
3. ``request_finished`` returns the ``kv_transfer_params`` decode needs (address,
   request id, token count, a compatibility record). The proxy copies them into
   the decode request.
4. Decode's scheduler sees ``do_remote_prefill``, checks compatibility, reserves
   blocks and marks the load asynchronous (the scheduler never blocks). Its worker
   fetches the entry through :class:`~kv_transfer.KVConsumer` and scatters it into
   its *own* block ids in a background thread, then reports the request in
   ``finished_recving``; vLLM skips recomputing those tokens. A failed load
   reports its blocks through ``get_block_ids_with_load_errors`` and vLLM applies
   ``kv_load_failure_policy``.

Entries that decode never asks for are dropped when their lease ends (bytes
released). With ``kv_mode`` ``rma`` (:mod:`.rma_worker`) step 2 stages nothing:
prefill leases the request's blocks in place (``request_finished`` returns True)
and decode GETs them straight into its own blocks, then tells prefill, whose
worker reports the request in ``finished_sending`` so vLLM frees the blocks. Transfer statistics go through ``get_kv_connector_stats``
(:mod:`.stats`); settings are in :mod:`.config`.

Hybrid models (vLLM's hybrid memory allocator, ``SupportsHMA``): each KV cache
group (full attention, sliding window) has its own block ids; steps 2 and 4 run
per group, a sliding-window group moving only its window's blocks (:mod:`.groups`).

Why pull + staging, not a push into decode's blocks: decode decides when it has
blocks, so a push would need decode's block ids before prefill finishes (an extra
round trip through the proxy), and reading prefill's blocks in place would pin
them until decode comes (the failure mode behind vLLM #21570 and block leaks).
The staging copy costs one memcpy of the request's KV on prefill.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

try:  # vLLM's marker for connectors that work with its hybrid memory allocator (several KV cache groups)
    from vllm.distributed.kv_transfer.kv_connector.v1.base import SupportsHMA
except ImportError:  # pragma: no cover - a vLLM without it has no hybrid allocator to support
    class SupportsHMA:  # type: ignore[no-redef]
        """Stand-in where vLLM has no hybrid memory allocator."""
try:  # failed receives by request id (vLLM refuses failed block ids with several KV cache groups)
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults
except ImportError:  # pragma: no cover - an older vLLM calls get_finished instead
    KVConnectorTransferResults = None  # type: ignore[assignment,misc]

from .config import UcxConfig
from .groups import kv_groups
from .metadata import UcxConnectorMetadata, compat_record
from .scheduler import UcxScheduler
from .stats import UcxKVConnectorStats
from .worker import RankInfo, UcxWorker

if TYPE_CHECKING:  # pragma: no cover
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

__all__ = ["UcxConnector"]


class UcxConnector(KVConnectorBase_V1, SupportsHMA):
    """vLLM's V1 KV connector over the LookupBuffer and the Pipe: a facade over :class:`UcxScheduler` or :class:`UcxWorker`.

    Supports vLLM's hybrid memory allocator (``SupportsHMA``): full-attention and
    sliding-window KV cache groups move each with its own block ids (see :mod:`.groups`).
    """

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config, role, kv_cache_config)
        groups = kv_groups(kv_cache_config, int(vllm_config.cache_config.block_size))
        self.config = UcxConfig.from_vllm(vllm_config, num_groups=len(groups))
        self.compat = compat_record(vllm_config, kv_cache_config, groups)
        self.scheduler: Optional[UcxScheduler] = None
        self.worker: Optional[UcxWorker] = None
        rank = RankInfo.from_vllm(vllm_config)
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler = UcxScheduler(self.config, self.compat, rank, groups=groups)
        else:
            self.worker = UcxWorker(self.config, rank,
                                    num_blocks=getattr(kv_cache_config, "num_blocks", None),
                                    layout_name=getattr(kv_cache_config, "kv_cache_layout", None), groups=groups)
        log.info("UcxConnector %s (%s) kv server %s:%s, KV cache groups %s", role.name,
                 "producer" if self.config.is_producer else "consumer", self.config.kv_host, self.config.kv_port,
                 self.compat["kv_groups"])

    # --------------------------------------------------------- scheduler side
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        self.scheduler.update_connector_output(connector_output)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request, block_ids)

    def request_finished_all_groups(self, request: "Request",
                                    block_ids: tuple[list[int], ...]) -> tuple[bool, dict[str, Any] | None]:
        """With the hybrid allocator on, vLLM calls this instead of ``request_finished`` (one list per group)."""
        return self.scheduler.request_finished(request, block_ids)

    # ------------------------------------------------------------ worker side
    def _meta(self) -> Optional[UcxConnectorMetadata]:
        meta = getattr(self, "_connector_metadata", None)
        return meta if isinstance(meta, UcxConnectorMetadata) else None

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._meta()
        if meta is not None:
            self.worker.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads are asynchronous: vLLM waits on finished_recving instead

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return None  # saved whole in wait_for_save, once every layer of the step is written

    def wait_for_save(self) -> None:
        meta = self._meta()
        if meta is not None:
            self.worker.wait_for_save(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self.worker.get_finished()

    def get_transfer_results(self, finished_req_ids: set[str]) -> Any:
        """Finished sends and receives with failed receives (by request: how vLLM wants them with several groups)."""
        send, recv, failed = self.worker.get_finished_and_failed()
        return KVConnectorTransferResults(finished_sending=send, finished_recving=recv, failed_recving=failed)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.get_block_ids_with_load_errors()

    def get_kv_connector_stats(self) -> Optional[KVConnectorStats]:
        if self.worker is not None:
            return self.worker.get_kv_connector_stats()
        return self.scheduler.counters.take() if self.scheduler is not None else None

    @classmethod
    def build_prom_metrics(cls, vllm_config: "VllmConfig", metric_types: dict, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> Any:
        """The ``vllm:ucxkv_*`` metrics on this instance's ``/metrics`` (see :mod:`.prom`)."""
        from .prom import UcxPromMetrics

        return UcxPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> Optional[KVConnectorStats]:
        return UcxKVConnectorStats(data=dict(data)) if data is not None else UcxKVConnectorStats()

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
