"""``vllm:ucxkv_*`` Prometheus metrics, through vLLM's connector hook (as NIXL's ``vllm:nixl_*``).

vLLM calls ``UcxConnector.build_prom_metrics`` once in the process that serves
``/metrics`` and then :meth:`UcxPromMetrics.observe` with every engine step's
stats payload (:mod:`.stats`, already merged across worker ranks). Every metric
carries vLLM's own labels (``model_name``, ``engine``); failures add ``role``
and ``cause``.

==========================================  =========  ==========================================
name (as exposed)                           type       meaning
==========================================  =========  ==========================================
``vllm:ucxkv_load_time_seconds``            histogram  decode: seconds per request from the start of
                                                       its fetch to its blocks written
``vllm:ucxkv_load_bytes``                   histogram  decode: bytes loaded per request
``vllm:ucxkv_save_time_seconds``            histogram  prefill: seconds per request to gather + stage
``vllm:ucxkv_save_bytes``                   histogram  prefill: bytes staged per request
``vllm:ucxkv_loaded_bytes_total``           counter    decode: bytes of KV written into its blocks
``vllm:ucxkv_loaded_requests_total``        counter    decode: requests whose KV loaded completely
``vllm:ucxkv_saved_bytes_total``            counter    prefill: bytes staged
``vllm:ucxkv_saved_requests_total``         counter    prefill: requests staged
``vllm:ucxkv_failed_transfers_total``       counter    by ``role`` (load, save, compat) and ``cause``
                                                       (peer_dead, timeout, compat, lease_expired,
                                                       integrity, other; buffer_full for saves)
``vllm:ucxkv_staged_bytes``                 gauge      prefill: bytes staged and leased, not yet
                                                       claimed (as of the engine's last step)
``vllm:ucxkv_staged_entries``               gauge      prefill: entries staged, not yet claimed
``vllm:ucxkv_leased_bytes``                 gauge      prefill, kv_mode rma: bytes of paged-cache
                                                       blocks held leased for decode (vLLM cannot
                                                       reuse them meanwhile)
``vllm:ucxkv_leased_entries``               gauge      prefill, kv_mode rma: requests held leased
==========================================  =========  ==========================================

Every failed load is a request vLLM recomputed (or failed, under
``kv_load_failure_policy=fail``): alert on ``rate(vllm:ucxkv_failed_transfers_total[5m])``
relative to ``rate(vllm:ucxkv_loaded_requests_total[5m])``, on any
``cause="integrity"`` at all, and on ``vllm:ucxkv_staged_bytes`` near the
configured ``kv_buffer_size`` (saves then wait for room); in rma mode on
``vllm:ucxkv_leased_bytes`` as a large share of the KV cache (new requests then wait
for blocks: with ``retain_kv`` each request holds its blocks until acknowledged).
"""

from __future__ import annotations

from typing import Any

from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    PromMetric,
    PromMetricT,
)
from vllm.v1.metrics.utils import create_metric_per_engine

from ..connector import FAILURE_CAUSES
from .stats import UcxKVConnectorStats

__all__ = ["UcxPromMetrics", "FAILURE_LABELS"]

#: Every (role, cause) pair created up front, so each series reads 0 before its first failure.
FAILURE_LABELS = tuple([("load", c) for c in FAILURE_CAUSES] + [("save", "buffer_full"), ("save", "other"),
                                                                ("compat", "compat")])

_TIME_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
_BYTE_BUCKETS = [2 ** (10 + i) for i in range(0, 25, 2)]  # 1 KiB .. 16 GiB


class UcxPromMetrics(KVConnectorPromMetrics):
    """The connector's Prometheus metrics (see the module doc); one per serving process."""

    def __init__(self, vllm_config: VllmConfig, metric_types: dict[type[PromMetric], type[PromMetricT]],
                 labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)

        def per_engine(cls: Any, name: str, doc: str, **kw: Any) -> dict[int, Any]:
            return create_metric_per_engine(cls(name=name, documentation=doc, labelnames=labelnames, **kw),
                                            per_engine_labelvalues)

        h, c, g = self._histogram_cls, self._counter_cls, self._gauge_cls
        self.samples = {
            "load_seconds": per_engine(h, "vllm:ucxkv_load_time_seconds",
                                       "Seconds per request to load its KV from prefill (decode).",
                                       buckets=_TIME_BUCKETS),
            "load_bytes": per_engine(h, "vllm:ucxkv_load_bytes", "Bytes of KV loaded per request (decode).",
                                     buckets=_BYTE_BUCKETS),
            "save_seconds": per_engine(h, "vllm:ucxkv_save_time_seconds",
                                       "Seconds per request to gather and stage its KV (prefill).",
                                       buckets=_TIME_BUCKETS),
            "save_bytes": per_engine(h, "vllm:ucxkv_save_bytes", "Bytes of KV staged per request (prefill).",
                                     buckets=_BYTE_BUCKETS),
        }
        self.counters = {
            "bytes_loaded": per_engine(c, "vllm:ucxkv_loaded_bytes", "Bytes of KV loaded into decode's blocks."),
            "requests_loaded": per_engine(c, "vllm:ucxkv_loaded_requests",
                                          "Requests whose KV loaded completely (decode)."),
            "bytes_saved": per_engine(c, "vllm:ucxkv_saved_bytes", "Bytes of KV staged for decode (prefill)."),
            "requests_saved": per_engine(c, "vllm:ucxkv_saved_requests", "Requests staged for decode (prefill)."),
        }
        gauge_docs = {  # each rank reports its own value; the latest one counts
            "staged_bytes": "Bytes staged and leased on prefill, not yet claimed by decode.",
            "staged_entries": "Entries staged on prefill, not yet claimed by decode.",
            "leased_bytes": "Bytes of KV cache blocks prefill holds leased for decode (kv_mode rma).",
            "leased_entries": "Requests whose KV blocks prefill holds leased for decode (kv_mode rma).",
        }
        self.gauges = {key: per_engine(g, f"vllm:ucxkv_{key}", doc, multiprocess_mode="mostrecent")
                       for key, doc in gauge_docs.items()}
        failed = c(name="vllm:ucxkv_failed_transfers",
                   documentation="KV transfers that failed, by role (load, save, compat) and cause; "
                                 "each failed load is a recomputed request.",
                   labelnames=[*labelnames, "role", "cause"])
        self.failed = {idx: {f"{role}/{cause}": failed.labels(*values, role, cause) for role, cause in FAILURE_LABELS}
                       for idx, values in per_engine_labelvalues.items()}
        self._failed_metric = failed
        self._gauge_ranks: dict[tuple[int, str], dict[str, int]] = {}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        """Record one step's stats payload (:class:`~.stats.UcxKVConnectorStats` ``data``) for ``engine_idx``."""
        data = UcxKVConnectorStats(data=dict(transfer_stats_data)).data
        for key, hist in self.samples.items():
            for v in data[key]:
                hist[engine_idx].observe(v)
        for key, counter in self.counters.items():
            if data[key]:
                counter[engine_idx].inc(data[key])
        failed = self.failed[engine_idx]
        for label, n in data["failed"].items():
            child = failed.get(label)
            if child is None:  # a cause this version does not list: still counted
                role, _, cause = label.partition("/")
                child = failed[label] = self._failed_metric.labels(*self.per_engine_labelvalues[engine_idx],
                                                                   role, cause)
            child.inc(n)
        for key, gauge in self.gauges.items():
            if data[key]:  # ranks report only changes: keep every rank's latest, expose the sum
                ranks = self._gauge_ranks.setdefault((engine_idx, key), {})
                ranks.update(data[key])
                gauge[engine_idx].set(sum(ranks.values()))
