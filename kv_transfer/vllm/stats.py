"""Transfer statistics of the vLLM connector: per-interval stats for vLLM's logger and Prometheus, and running totals.

One interval's :class:`UcxKVConnectorStats` ``data`` (plain, msgpack-able values):

* :data:`COUNTER_KEYS`: numbers summed across intervals and worker ranks;
* :data:`SAMPLE_KEYS`: one entry per request (seconds and bytes of each load
  and save), concatenated, for histograms;
* ``"failed"``: ``{"<role>/<cause>": count}`` with role ``load``, ``save`` or
  ``compat`` (refused by decode's scheduler) and a cause from
  :data:`kv_transfer.connector.FAILURE_CAUSES` (or ``buffer_full`` for saves);
* :data:`GAUGE_KEYS`: ``{"<rank>": value}`` as of the interval's end: the bytes
  and entries staged (leased, not yet claimed) in each producer rank's buffer, and in
  rma mode the bytes and requests of paged-cache blocks it holds leased for readers.
  Merging keeps each rank's latest value; the instance's value is the sum.

vLLM moves the object from each worker (``get_kv_connector_stats``, every
engine step) to the frontend, where :mod:`.prom` turns it into ``vllm:ucxkv_*``
metrics and :meth:`UcxKVConnectorStats.reduce` into its log line.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Optional

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

__all__ = ["UcxKVConnectorStats", "TransferCounters", "COUNTER_KEYS", "SAMPLE_KEYS", "GAUGE_KEYS"]

#: The counters one worker keeps (bytes, requests, seconds, failures per role).
COUNTER_KEYS = ("bytes_saved", "requests_saved", "save_s", "save_failures",
                "bytes_loaded", "requests_loaded", "load_s", "load_failures")
#: Per-request samples: seconds and bytes of each successful load and save.
SAMPLE_KEYS = ("load_seconds", "load_bytes", "save_seconds", "save_bytes")
#: Per-rank gauges (producer): bytes and entries staged and leased, not yet claimed (stage mode);
#: bytes and requests of KV blocks held under a lease for readers (rma mode).
GAUGE_KEYS = ("staged_bytes", "staged_entries", "leased_bytes", "leased_entries")


def _empty() -> dict[str, Any]:
    d: dict[str, Any] = {k: 0 for k in COUNTER_KEYS}
    d["save_s"] = d["load_s"] = 0.0
    d.update({k: [] for k in SAMPLE_KEYS})
    d["failed"] = {}
    d.update({k: {} for k in GAUGE_KEYS})
    return d


def merge_into(dst: dict[str, Any], src: dict[str, Any]) -> None:
    """Add interval ``src`` to ``dst``: counters and failures sum, samples concatenate, gauges take src's ranks."""
    for k, v in src.items():
        if k in GAUGE_KEYS:
            dst.setdefault(k, {}).update(v)
        elif k == "failed":
            f = dst.setdefault(k, {})
            for cause, n in v.items():
                f[cause] = f.get(cause, 0) + n
        elif isinstance(v, list):
            dst.setdefault(k, []).extend(v)
        else:
            dst[k] = dst.get(k, 0) + v


@dataclass
class UcxKVConnectorStats(KVConnectorStats):
    """What vLLM aggregates across workers and steps, logs and observes: one interval (see the module doc)."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()
        else:  # from an older or partial payload: fill in what is missing
            for k, v in _empty().items():
                self.data.setdefault(k, v)

    def reset(self) -> None:
        self.data = _empty()

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        merge_into(self.data, other.data)
        return self

    def reduce(self) -> dict[str, int | float]:
        d = {k: self.data[k] for k in COUNTER_KEYS}
        if d.get("requests_loaded"):
            d["avg_load_ms"] = round(1000 * d["load_s"] / d["requests_loaded"], 3)
            d["load_MiBps"] = round(d["bytes_loaded"] / max(d["load_s"], 1e-9) / 2**20, 1)
        for cause, n in sorted(self.data["failed"].items()):
            d[f"failed {cause}"] = n
        for k in ("staged_bytes", "leased_bytes"):
            if self.data[k]:
                d[k] = sum(self.data[k].values())
        return d

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in (*COUNTER_KEYS, *SAMPLE_KEYS, "failed", *GAUGE_KEYS))


class TransferCounters:
    """Thread-safe: ``take()`` hands vLLM one interval, ``totals()`` keeps counting since start."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._interval = UcxKVConnectorStats()
        self._totals: dict[str, Any] = _empty()
        self._gauges_sent: dict[str, dict[str, int]] = {k: {} for k in GAUGE_KEYS}

    def _add(self, part: dict[str, Any]) -> None:
        with self._lock:
            merge_into(self._interval.data, part)
            merge_into(self._totals, {k: v for k, v in part.items() if k not in SAMPLE_KEYS})

    def add(self, **counts: Any) -> None:
        """Add to named counters (names from :data:`COUNTER_KEYS`)."""
        for k in counts:
            if k not in COUNTER_KEYS:
                raise KeyError(f"unknown transfer counter {k!r}")
        self._add(counts)

    def record_load(self, seconds: float, nbytes: int) -> None:
        """One request's KV loaded: counters plus one histogram sample each."""
        self._add({"bytes_loaded": nbytes, "requests_loaded": 1, "load_s": seconds,
                   "load_seconds": [seconds], "load_bytes": [nbytes]})

    def record_save(self, seconds: float, nbytes: int) -> None:
        """One request's KV staged: counters plus one histogram sample each."""
        self._add({"bytes_saved": nbytes, "requests_saved": 1, "save_s": seconds,
                   "save_seconds": [seconds], "save_bytes": [nbytes]})

    def record_failure(self, role: str, cause: Optional[str]) -> None:
        """One failed transfer of ``role`` ("load", "save" or "compat") for ``cause``."""
        part: dict[str, Any] = {"failed": {f"{role}/{cause or 'other'}": 1}}
        if role in ("load", "save"):
            part[f"{role}_failures"] = 1
        self._add(part)

    def set_gauges(self, rank: str, **values: int) -> None:
        """This rank's current gauge values (:data:`GAUGE_KEYS`); reported in the next interval when changed."""
        with self._lock:
            for k, v in values.items():
                if k not in GAUGE_KEYS:
                    raise KeyError(f"unknown transfer gauge {k!r}")
                self._totals[k][rank] = v
                if self._gauges_sent[k].get(rank) != v:
                    self._interval.data[k][rank] = v

    def take(self) -> UcxKVConnectorStats | None:
        """This interval's stats (None if nothing happened), then start a new interval."""
        with self._lock:
            if self._interval.is_empty():
                return None
            out = self._interval
            for k in GAUGE_KEYS:
                self._gauges_sent[k].update(out.data[k])
            self._interval = UcxKVConnectorStats()
            return out

    def totals(self) -> dict[str, Any]:
        """Every counter and failure cause since this worker started, and the latest gauges (never reset)."""
        with self._lock:
            return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self._totals.items()}
