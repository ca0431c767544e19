"""Transfer counters of the vLLM connector: per-interval stats for vLLM's logger, and running totals."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

__all__ = ["UcxKVConnectorStats", "TransferCounters", "COUNTER_KEYS"]

#: The counters one worker keeps (bytes, requests, seconds, failures per role).
COUNTER_KEYS = ("bytes_saved", "requests_saved", "save_s", "save_failures",
                "bytes_loaded", "requests_loaded", "load_s", "load_failures")


@dataclass
class UcxKVConnectorStats(KVConnectorStats):
    """What vLLM aggregates across workers and logs: one interval's :data:`COUNTER_KEYS`."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {k: 0 for k in COUNTER_KEYS}
        self.data["save_s"] = self.data["load_s"] = 0.0

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        d = dict(self.data)
        if d.get("requests_loaded"):
            d["avg_load_ms"] = round(1000 * d["load_s"] / d["requests_loaded"], 3)
            d["load_MiBps"] = round(d["bytes_loaded"] / max(d["load_s"], 1e-9) / 2**20, 1)
        return d

    def is_empty(self) -> bool:
        return not any(self.data.values())


class TransferCounters:
    """Thread-safe counters: ``take()`` hands vLLM one interval, ``totals()`` keeps counting since start."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._interval = UcxKVConnectorStats()
        self._totals = UcxKVConnectorStats()

    def add(self, **counts: Any) -> None:
        """Add to named counters (names from :data:`COUNTER_KEYS`)."""
        with self._lock:
            for k, v in counts.items():
                if k not in COUNTER_KEYS:
                    raise KeyError(f"unknown transfer counter {k!r}")
                self._interval.data[k] += v
                self._totals.data[k] += v

    def take(self) -> UcxKVConnectorStats | None:
        """This interval's counters (None if nothing happened), then start a new interval."""
        with self._lock:
            if self._interval.is_empty():
                return None
            out = UcxKVConnectorStats(data=dict(self._interval.data))
            self._interval.reset()
            return out

    def totals(self) -> dict[str, int | float]:
        """Every counter since this worker started (never reset)."""
        with self._lock:
            return dict(self._totals.data)
