"""The connector's scheduler half: decides per step what prefill stages and what decode loads; never blocks.

Prefill (producer): a request with ``do_remote_decode`` is tracked from its
allocation until ``request_finished``; in the step its prompt completes, its
blocks go into the step's metadata as a :class:`SaveSpec`, and
``request_finished`` returns the ``kv_transfer_params`` decode needs.

Decode (consumer): a request with ``do_remote_prefill`` and a matching
compatibility record gets its remote tokens counted as external, its blocks
reserved and a :class:`LoadSpec` queued; the load is asynchronous (vLLM waits
for ``finished_recving``). A request finished while still loading keeps its
blocks (``request_finished`` returns True) until the worker reports the load
stopped. Rank-agnostic: under tensor parallelism every worker rank receives the
same metadata. It knows sizes, not ranks: prefill's ``kv_transfer_params``
name its DP engine's *base* KV port (``rank_port(kv_port, 0, tp, dp_index=dp)``)
and its TP size; each decode worker rank works out which prefill ranks (ports
``base + p``) and heads it reads.

Hybrid models: every block list is one per KV cache group (:mod:`.groups`
says which blocks of each group move); a spec carries each group's.

:meth:`UcxScheduler.books` counts what the scheduler holds; all zero once every
request has finished and the worker reported its loads.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Optional

from vllm.v1.request import RequestStatus

from .config import UcxConfig
from ..tp_mapping import rank_port
from .groups import KVGroup, transfer_blocks
from .metadata import LoadSpec, RenewSpec, SaveSpec, UcxConnectorMetadata, compat_problem
from .rma_worker import choose_kv_mode
from .worker import RankInfo
from .stats import TransferCounters

if TYPE_CHECKING:  # pragma: no cover
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

__all__ = ["UcxScheduler"]


class UcxScheduler:
    """Scheduler-side state of one connector; needs no model, no caches and no transport.

    Args:
        config: The connector's settings.
        compat: This instance's compatibility record (see :mod:`.metadata`).
        rank: This instance's TP/DP place.
        groups: The KV cache groups moved (see :mod:`.groups`); None: one full-attention group.
    """

    def __init__(self, config: UcxConfig, compat: dict[str, str], rank: Optional[RankInfo] = None,
                 groups: Optional[list[KVGroup]] = None):
        self.config = config
        self.compat = compat
        self.rank = rank or RankInfo()
        self.groups = groups or [KVGroup(0, (), config.block_size)]
        #: The first port of this engine's workers (rank p serves on base_port + p); kv_port for TP 1 / DP 0.
        self.base_port = rank_port(config.kv_port, 0, self.rank.tp_size, dp_index=self.rank.dp_rank)
        # producer books
        self._producer_reqs: dict[str, Any] = {}  # request id -> Request, allocation .. request_finished
        self._save_blocks: dict[str, list[list[int]]] = {}  # one list per KV cache group (vLLM's index)
        self._saved: set[str] = set()  # staged this run, params not yet returned
        # consumer books
        self._pending_loads: list[LoadSpec] = []  # queued for the next step's metadata
        self._loading: set[str] = set()  # handed to the worker, not yet reported back
        self._cancel: list[str] = []  # finished while loading: tell the worker
        self.loads_failed = 0  # blocks the worker reported as not loaded (requests recomputed)
        #: "stage" or "rma": how this producer holds a finished prompt's KV (rma: leased blocks, delayed free)
        self.kv_mode = choose_kv_mode(config)[0] if config.is_producer else "stage"
        self._release: list[str] = []  # rma: leased requests no reader will come for (aborted)
        self._waiting_rma: dict[str, tuple[RenewSpec, float, float]] = {}  # rma consumer: (spec, every s, next at)
        self._retained: dict[str, RenewSpec] = {}  # consumer: loads of KV prefill keeps until acknowledged
        self._acks: list[RenewSpec] = []  # consumer: answered requests whose retained KV prefill may drop
        # tokens decode's prefix cache already holds, per request: vLLM sets request.num_computed_tokens
        # only after update_state_after_alloc, so the skip is remembered from get_num_new_matched_tokens
        self._local_hit: dict[str, int] = {}
        self.counters = TransferCounters()  # requests refused for compatibility (vllm:ucxkv_* metrics)

    def books(self) -> dict[str, int]:
        """How many entries each of the scheduler's books holds (all zero when idle)."""
        return {"producer_reqs": len(self._producer_reqs), "save_blocks": len(self._save_blocks),
                "saved": len(self._saved), "pending_loads": len(self._pending_loads),
                "loading": len(self._loading), "cancel": len(self._cancel), "release": len(self._release),
                "waiting_rma": len(self._waiting_rma), "local_hit": len(self._local_hit),
                "retained": len(self._retained), "acks": len(self._acks)}

    # ------------------------------------------------------------- decode side
    def _remote(self, params: dict[str, Any]) -> RenewSpec:
        """Where prefill holds a request's KV (its id, base address, TP size), from its kv_transfer_params."""
        return RenewSpec(str(params["remote_request_id"]), f"{params['remote_host']}:{params['remote_port']}",
                         int(params.get("remote_tp_size", 1)), int(self.compat.get("num_kv_heads", 0)),
                         str(params.get("kv_mode", "stage")))

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens decode will load from prefill beyond ``num_computed_tokens``, and True (asynchronously)."""
        params = request.kv_transfer_params or {}
        if not self.config.is_consumer or not params.get("do_remote_prefill") or request.request_id in self._loading:
            return 0, False
        problem = compat_problem(self.compat, params.get("compat"))
        if problem:
            log.error("request %s: prefill and decode KV caches are incompatible (%s); recomputing locally",
                      request.request_id, problem)
            self.counters.record_failure("compat", "compat")
            params["do_remote_prefill"] = False  # counted once: the request is now a local one
            return 0, False
        n = min(int(params.get("remote_num_tokens", 0)), len(request.prompt_token_ids)) - num_computed_tokens
        if n <= 0:
            return 0, False
        self._local_hit[request.request_id] = num_computed_tokens
        if params.get("kv_mode") == "rma" and request.request_id not in self._waiting_rma:
            # until its blocks are allocated, renew prefill's lease (a backlog must not turn into recomputation)
            every = max(0.05, float(params.get("lease_s", 30.0)) / 3)
            self._waiting_rma[request.request_id] = (self._remote(params), every, time.monotonic() + every)
        return n, True

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        """Track a producer request, or queue a consumer request's load into its newly reserved blocks."""
        params = request.kv_transfer_params or {}
        rid = request.request_id
        if self.config.is_producer and params.get("do_remote_decode"):
            self._producer_reqs[rid] = request
        if not (self.config.is_consumer and params.get("do_remote_prefill") and num_external_tokens > 0):
            return
        if rid in self._loading:
            return
        local_hit = self._local_hit.pop(rid, request.num_computed_tokens)
        num_tokens = min(int(params["remote_num_tokens"]), len(request.prompt_token_ids))
        retain = bool(params.get("retain_kv", False))
        if not retain:  # retained rma KV: renewed until the request finishes (a failover may read it again)
            self._waiting_rma.pop(rid, None)
        if retain:  # acknowledged when the request completes (request_finished), so another decode may load it
            self._retained[rid] = self._remote(params)
        ids, skips = transfer_blocks(self.groups, blocks.get_block_ids(), num_tokens, local_hit)
        self._pending_loads.append(LoadSpec(
            req_id=rid,
            remote_request_id=str(params["remote_request_id"]),
            remote_address=f"{params['remote_host']}:{params['remote_port']}",
            remote_tp_size=int(params.get("remote_tp_size", 1)),
            total_kv_heads=int(self.compat.get("num_kv_heads", 0)),
            perturb_rank=params.get("ucxkv_debug_perturb_rank"),
            kv_mode=str(params.get("kv_mode", "stage")),
            retain=retain,
            stall_after_claim_s=float(params.get("ucxkv_debug_stall_after_claim_s", 0.0)),
            token_ids=list(request.prompt_token_ids[:num_tokens]),
            num_tokens=num_tokens,
            block_ids=ids[0],
            skip_blocks=skips[0],
            more_groups=list(zip(ids[1:], skips[1:])),
            perturb=(self.config.perturb or bool(params.get("ucxkv_debug_perturb", False))
                     or params.get("ucxkv_debug_perturb_rank") is not None),
        ))
        self._loading.add(rid)
        params["do_remote_prefill"] = False  # a retry after failure recomputes instead of looping

    # -------------------------------------------------------------- both sides
    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> UcxConnectorMetadata:
        """This step's saves (prompts completed in it), queued loads and cancellations; empties the queues."""
        meta = UcxConnectorMetadata()
        if self.config.is_producer:
            n_sched = scheduler_output.num_scheduled_tokens
            for new in scheduler_output.scheduled_new_reqs:
                if new.req_id in self._producer_reqs:
                    self._save_blocks[new.req_id] = [list(b) for b in new.block_ids]
                    self._maybe_save(meta, new.req_id, new.num_computed_tokens + n_sched.get(new.req_id, 0))
            cached = scheduler_output.scheduled_cached_reqs
            for i, rid in enumerate(cached.req_ids):
                if rid in self._producer_reqs and rid not in self._saved:
                    nb = cached.new_block_ids[i]
                    if nb is not None:
                        have = self._save_blocks.get(rid)
                        if rid in cached.resumed_req_ids or have is None:
                            self._save_blocks[rid] = [list(b) for b in nb]
                        else:
                            for mine, new_ids in zip(have, nb):
                                mine.extend(new_ids)
                    self._maybe_save(meta, rid, cached.num_computed_tokens[i] + n_sched.get(rid, 0))
        meta.to_load, self._pending_loads = self._pending_loads, []
        meta.cancel_loads, self._cancel = self._cancel, []
        meta.release_leases, self._release = self._release, []
        meta.ack_loads, self._acks = self._acks, []
        now = time.monotonic()
        for rid, (spec, every, due) in list(self._waiting_rma.items()):
            if now >= due:
                meta.renew_leases.append(spec)
                self._waiting_rma[rid] = (spec, every, now + every)
        return meta

    def _maybe_save(self, meta: UcxConnectorMetadata, rid: str, computed_after_step: int) -> None:
        req = self._producer_reqs[rid]
        n = len(req.prompt_token_ids)
        if rid in self._saved or computed_after_step < n:
            return
        have = self._save_blocks.get(rid) or [[] for _ in range(1 + max(g.index for g in self.groups))]
        ids, _ = transfer_blocks(self.groups, have, n)
        corrupt = bool((req.kv_transfer_params or {}).get("ucxkv_debug_corrupt", False))
        meta.to_save.append(SaveSpec(rid, list(req.prompt_token_ids), ids[0], corrupt=corrupt, more_groups=ids[1:]))
        self._saved.add(rid)

    def update_connector_output(self, connector_output: Any) -> None:
        """The workers' report: loads that ended (either way) leave the books; failed blocks are counted."""
        for rid in connector_output.finished_recving or ():
            self._loading.discard(rid)
        self.loads_failed += len(getattr(connector_output, "invalid_block_ids", None) or ())

    def request_finished(self, request: "Request", block_ids: Any = None) -> tuple[bool, dict[str, Any] | None]:
        """Forget the request; returns (keep its blocks until the worker stops writing, decode's params)."""
        rid = request.request_id
        self._producer_reqs.pop(rid, None)
        self._save_blocks.pop(rid, None)
        self._waiting_rma.pop(rid, None)
        self._local_hit.pop(rid, None)
        retained = self._retained.pop(rid, None)
        if retained is not None and request.status in (RequestStatus.FINISHED_STOPPED,
                                                       RequestStatus.FINISHED_LENGTH_CAPPED):
            # answered in full: prefill may drop the KV. Not on an abort (the client or the proxy cut
            # decode off): the proxy may retry on another decode, which loads it again until the lease ends.
            self._acks.append(retained)
        if self.config.is_consumer and rid in self._loading:
            # The worker may still be writing into these blocks: keep them until it says it stopped.
            self._cancel.append(rid)
            return True, None
        staged = rid in self._saved
        self._saved.discard(rid)
        if not (self.config.is_producer and staged):
            return False, None
        rma = self.kv_mode == "rma"  # the worker leased these blocks: vLLM frees them when it reports them sent
        if request.status == RequestStatus.FINISHED_ABORTED:
            if rma:
                self._release.append(rid)
            return rma, None
        return rma, {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_request_id": rid,
            "remote_host": self.config.advertise_host,
            "remote_port": self.base_port,
            "remote_tp_size": self.rank.tp_size,
            "remote_dp_index": self.rank.dp_rank,
            "remote_num_tokens": len(request.prompt_token_ids),
            "compat": dict(self.compat),
            "kv_mode": self.kv_mode,
            "lease_s": self.config.lease_s,
            **({"retain_kv": True} if self.config.retain_kv else {}),
        }
