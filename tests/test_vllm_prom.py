"""The stats -> ``vllm:ucxkv_*`` Prometheus mapping, without a model: counters, histograms, causes, gauges."""

from __future__ import annotations

import types

import pytest

pytest.importorskip("vllm")

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest  # noqa: E402

from kv_transfer.vllm import UcxConnector  # noqa: E402
from kv_transfer.vllm.stats import TransferCounters  # noqa: E402


def _metrics(reg: CollectorRegistry):
    """vLLM's metric_types, bound to a private registry (a second build must not clash with the global one)."""
    def bound(base):
        return type(base.__name__, (base,), {"__init__": lambda self, *a, **k: base.__init__(self, *a, registry=reg, **k)})

    types_ = {Counter: bound(Counter), Gauge: bound(Gauge), Histogram: bound(Histogram)}
    cfg = types.SimpleNamespace(kv_transfer_config=None)
    return UcxConnector.build_prom_metrics(cfg, types_, ["model_name", "engine"], {0: ["m", "0"], 1: ["m", "1"]})


def _value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    v = reg.get_sample_value(name, {"model_name": "m", "engine": "0", **labels})
    assert v is not None, f"{name} {labels} not exposed:\n{generate_latest(reg).decode()}"
    return v


def test_worker_stats_of_two_ranks_and_steps_reach_the_metrics():
    reg = CollectorRegistry()
    prom = _metrics(reg)
    rank0, rank1 = TransferCounters(), TransferCounters()
    rank0.record_load(0.020, 4096)
    rank0.record_load(0.300, 1 << 20)
    rank1.record_load(0.004, 4096)
    rank0.record_failure("load", "integrity")
    rank1.record_failure("load", "peer_dead")
    rank0.set_gauges("tp0", staged_bytes=1000, staged_entries=2)
    rank1.set_gauges("tp1", staged_bytes=500, staged_entries=1)
    rank0.set_gauges("tp0", leased_bytes=8192, leased_entries=1)  # an rma producer's held blocks
    step = UcxConnector.build_kv_connector_stats(rank0.take().data).aggregate(rank1.take())  # vLLM across ranks
    prom.observe(step.to_dict(), engine_idx=0)
    assert _value(reg, "vllm:ucxkv_loaded_requests_total") == 3
    assert _value(reg, "vllm:ucxkv_loaded_bytes_total") == 4096 * 2 + (1 << 20)
    assert _value(reg, "vllm:ucxkv_load_time_seconds_count") == 3
    assert _value(reg, "vllm:ucxkv_load_time_seconds_bucket", le="0.005") == 1
    assert _value(reg, "vllm:ucxkv_load_time_seconds_bucket", le="0.025") == 2
    assert _value(reg, "vllm:ucxkv_load_bytes_sum") == 4096 * 2 + (1 << 20)
    assert _value(reg, "vllm:ucxkv_failed_transfers_total", role="load", cause="integrity") == 1
    assert _value(reg, "vllm:ucxkv_failed_transfers_total", role="load", cause="peer_dead") == 1
    assert _value(reg, "vllm:ucxkv_failed_transfers_total", role="load", cause="timeout") == 0  # exposed at 0
    assert _value(reg, "vllm:ucxkv_staged_bytes") == 1500 and _value(reg, "vllm:ucxkv_staged_entries") == 3
    assert _value(reg, "vllm:ucxkv_leased_bytes") == 8192 and _value(reg, "vllm:ucxkv_leased_entries") == 1

    # next step: rank 0's buffer drained, rank 1 unchanged (not resent): the gauge is the sum of the latest
    rank0.set_gauges("tp0", staged_bytes=0, staged_entries=0)
    rank1.set_gauges("tp1", staged_bytes=500, staged_entries=1)
    assert rank1.take() is None  # nothing new on rank 1
    rank0.record_save(0.01, 777)
    prom.observe(rank0.take().to_dict(), engine_idx=0)
    assert _value(reg, "vllm:ucxkv_staged_bytes") == 500  # rank 1's last value still counts
    assert _value(reg, "vllm:ucxkv_saved_requests_total") == 1 and _value(reg, "vllm:ucxkv_saved_bytes_total") == 777
    assert _value(reg, "vllm:ucxkv_save_bytes_count") == 1
    assert _value(reg, "vllm:ucxkv_loaded_requests_total", engine="1") == 0  # engine 1 untouched


def test_compat_refusals_and_unknown_causes_are_counted():
    reg = CollectorRegistry()
    prom = _metrics(reg)
    c = TransferCounters()
    c.record_failure("compat", "compat")
    c.record_failure("save", "buffer_full")
    c.record_failure("load", "something_new")
    prom.observe(c.take().to_dict())
    assert _value(reg, "vllm:ucxkv_failed_transfers_total", role="compat", cause="compat") == 1
    assert _value(reg, "vllm:ucxkv_failed_transfers_total", role="save", cause="buffer_full") == 1
    assert _value(reg, "vllm:ucxkv_failed_transfers_total", role="load", cause="something_new") == 1
    assert c.totals()["load_failures"] == 1 and c.totals()["save_failures"] == 1
    assert c.totals()["failed"] == {"compat/compat": 1, "save/buffer_full": 1, "load/something_new": 1}
