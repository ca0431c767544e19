"""The connector's scheduler half without a model: fake Request / KVCacheBlocks / SchedulerOutput, as vLLM's own connector unit tests do.

Every test ends with the invariant that nothing is left in the scheduler's books.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

pytest.importorskip("vllm")

from vllm.v1.request import RequestStatus  # noqa: E402

from kv_transfer.vllm import CONNECTOR_PROTOCOL, LoadSpec, UcxConfig, UcxConnector, UcxScheduler  # noqa: E402
from kv_transfer.vllm.stats import TransferCounters  # noqa: E402

BS = 4
COMPAT = {"protocol": str(CONNECTOR_PROTOCOL), "model": "m", "dtype": "torch.float32", "num_layers": "2",
          "num_kv_heads": "2", "head_size": "8", "block_size": str(BS), "layout": "NHD", "kv_groups": "full/*"}
EMPTY = {"producer_reqs": 0, "save_blocks": 0, "saved": 0, "pending_loads": 0, "loading": 0, "cancel": 0,
         "release": 0, "waiting_rma": 0, "local_hit": 0, "retained": 0, "acks": 0}


@dataclass
class FakeRequest:
    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: dict[str, Any] | None = None
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING


@dataclass
class FakeBlocks:
    ids: list[int]

    def get_block_ids(self) -> tuple[list[int], ...]:
        return (list(self.ids),)


@dataclass
class NewReq:
    req_id: str
    block_ids: tuple[list[int], ...]
    num_computed_tokens: int = 0


@dataclass
class CachedReqs:
    req_ids: list[str] = field(default_factory=list)
    new_block_ids: list[Any] = field(default_factory=list)
    resumed_req_ids: set[str] = field(default_factory=set)
    num_computed_tokens: list[int] = field(default_factory=list)


@dataclass
class StepOutput:
    scheduled_new_reqs: list[NewReq] = field(default_factory=list)
    scheduled_cached_reqs: CachedReqs = field(default_factory=CachedReqs)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)


@dataclass
class WorkerReport:
    finished_recving: set[str] | None = None
    finished_sending: set[str] | None = None
    invalid_block_ids: set[int] = field(default_factory=set)


def consumer() -> UcxScheduler:
    return UcxScheduler(UcxConfig(is_producer=False, is_consumer=True, block_size=BS), dict(COMPAT))


def producer() -> UcxScheduler:
    return UcxScheduler(UcxConfig(is_producer=True, is_consumer=False, block_size=BS, advertise_host="10.0.0.7",
                                  kv_port=14600), dict(COMPAT))


def remote_params(n_tokens: int, **extra: Any) -> dict[str, Any]:
    return dict({"do_remote_prefill": True, "remote_request_id": "p-1", "remote_host": "10.0.0.7",
                 "remote_port": 14600, "remote_num_tokens": n_tokens, "compat": dict(COMPAT)}, **extra)


def start_load(s: UcxScheduler, req: FakeRequest, blocks: list[int], local_hit: int = 0) -> LoadSpec:
    """What vLLM's scheduler does for a new request with remote KV, up to the step's metadata: it asks with
    the prefix-cache hit ``local_hit`` but sets ``request.num_computed_tokens`` only after the allocation."""
    n, is_async = s.get_num_new_matched_tokens(req, local_hit)
    assert is_async and n == len(req.prompt_token_ids) - local_hit
    s.update_state_after_alloc(req, FakeBlocks(blocks), n)
    meta = s.build_connector_meta(StepOutput())
    assert len(meta.to_load) == 1 and not meta.to_save
    return meta.to_load[0]


def test_loaded_request_leaves_nothing_behind():
    s = consumer()
    req = FakeRequest("d-1", list(range(10)), remote_params(10))
    spec = start_load(s, req, [7, 3, 9, 11])
    assert spec.block_ids == [7, 3, 9] and spec.skip_blocks == 0 and spec.remote_address == "10.0.0.7:14600"
    assert spec.remote_request_id == "p-1" and spec.token_ids == list(range(10)) and spec.num_tokens == 10
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)  # while loading: no second load
    assert s.build_connector_meta(StepOutput()).to_load == []
    s.update_connector_output(WorkerReport(finished_recving={"d-1"}))
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    assert s.request_finished(req, [7, 3, 9, 11]) == (False, None)
    assert s.books() == EMPTY and s.loads_failed == 0


def test_prefix_cached_blocks_are_skipped():
    s = consumer()
    req = FakeRequest("d-1", list(range(10)), remote_params(10))  # num_computed_tokens still 0, as in vLLM
    spec = start_load(s, req, [5, 6, 8], local_hit=BS)
    assert spec.skip_blocks == 1 and spec.block_ids == [5, 6, 8]
    s.update_connector_output(WorkerReport(finished_recving={"d-1"}))
    s.request_finished(req, [5, 6, 8])
    assert s.books() == EMPTY


def test_aborted_mid_load_keeps_blocks_until_the_worker_stops():
    s = consumer()
    req = FakeRequest("d-1", list(range(8)), remote_params(8))
    start_load(s, req, [1, 2])
    req.status = RequestStatus.FINISHED_ABORTED
    assert s.request_finished(req, [1, 2]) == (True, None)  # the worker may still write into them
    meta = s.build_connector_meta(StepOutput())
    assert meta.cancel_loads == ["d-1"] and meta.to_load == []
    assert s.books()["loading"] == 1
    s.update_connector_output(WorkerReport(finished_recving={"d-1"}, finished_sending={"d-1"},
                                           invalid_block_ids={1, 2}))
    assert s.build_connector_meta(StepOutput()).cancel_loads == []
    assert s.books() == EMPTY


@pytest.mark.parametrize("why", ["failed", "expired"])
def test_failed_or_expired_load_is_recomputed_not_retried(why):
    """The worker reports the load ended with bad blocks (producer gone, or its lease expired: same report)."""
    s = consumer()
    req = FakeRequest("d-1", list(range(12)), remote_params(12))
    start_load(s, req, [4, 5, 6])
    s.update_connector_output(WorkerReport(finished_recving={"d-1"}, invalid_block_ids={4, 5, 6}))
    assert s.loads_failed == 3
    # vLLM's recompute policy reschedules the request: it must not ask for the remote KV again
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    s.update_state_after_alloc(req, FakeBlocks([4, 5, 6]), 0)
    assert s.build_connector_meta(StepOutput()).to_load == []
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    assert s.request_finished(req, [4, 5, 6]) == (False, None)
    assert s.books() == EMPTY


def test_incompatible_producer_is_refused_before_anything_is_booked():
    s = consumer()
    req = FakeRequest("d-1", list(range(8)), remote_params(8, compat=dict(COMPAT, num_kv_heads="4")))
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)  # asked again (no blocks yet): counted once
    s.update_state_after_alloc(req, FakeBlocks([1, 2]), 0)
    assert s.request_finished(req, [1, 2]) == (False, None)
    assert s.books() == EMPTY
    refused = s.counters.take()  # what the scheduler-side connector hands vLLM (vllm:ucxkv_* metrics)
    assert refused.data["failed"] == {"compat/compat": 1} and s.counters.take() is None


def test_producer_stages_when_the_prompt_completes_and_returns_decode_params():
    s = producer()
    req = FakeRequest("p-1", list(range(10)), {"do_remote_decode": True})
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    s.update_state_after_alloc(req, FakeBlocks([3, 4]), 0)
    # chunked prefill: 8 of 10 tokens in the first step, nothing to save yet
    meta = s.build_connector_meta(StepOutput([NewReq("p-1", ([3, 4],))], num_scheduled_tokens={"p-1": 8}))
    assert meta.to_save == []
    meta = s.build_connector_meta(StepOutput(scheduled_cached_reqs=CachedReqs(["p-1"], [([9],)], set(), [8]),
                                             num_scheduled_tokens={"p-1": 2}))
    assert [(x.req_id, x.block_ids, x.token_ids) for x in meta.to_save] == [("p-1", [3, 4, 9], list(range(10)))]
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    keep, params = s.request_finished(req, [3, 4, 9])
    assert keep is False and params["remote_request_id"] == "p-1" and params["remote_num_tokens"] == 10
    assert params["remote_host"] == "10.0.0.7" and params["remote_port"] == 14600 and params["compat"] == COMPAT
    assert s.books() == EMPTY


def test_producer_request_aborted_returns_no_params_and_forgets_it():
    s = producer()
    for status, staged in ((RequestStatus.FINISHED_ABORTED, True), (RequestStatus.FINISHED_ABORTED, False)):
        req = FakeRequest("p-2", list(range(4)), {"do_remote_decode": True}, status=status)
        s.update_state_after_alloc(req, FakeBlocks([1]), 0)
        if staged:
            meta = s.build_connector_meta(StepOutput([NewReq("p-2", ([1],))], num_scheduled_tokens={"p-2": 4}))
            assert len(meta.to_save) == 1
        assert s.request_finished(req, [1]) == (False, None)
        assert s.books() == EMPTY


def test_counters_hand_out_intervals_and_keep_totals():
    c = TransferCounters()
    assert c.take() is None
    c.add(bytes_loaded=100, requests_loaded=1, load_s=0.5)
    c.add(load_failures=1)
    got = c.take()
    assert got.data["bytes_loaded"] == 100 and got.data["load_failures"] == 1 and got.reduce()["avg_load_ms"] == 500
    assert c.take() is None  # a new interval
    c.add(bytes_saved=7, requests_saved=1)
    assert c.totals()["bytes_loaded"] == 100 and c.totals()["bytes_saved"] == 7
    merged = UcxConnector.build_kv_connector_stats(got.data).aggregate(c.take())  # what vLLM does across ranks
    assert merged.data["bytes_saved"] == 7 and merged.data["bytes_loaded"] == 100
    with pytest.raises(KeyError, match="bytes_sent"):
        c.add(bytes_sent=1)


def test_tp_producer_names_its_engine_base_port_and_tp_size():
    from kv_transfer.vllm import RankInfo

    s = UcxScheduler(UcxConfig(is_producer=True, is_consumer=False, block_size=BS, advertise_host="10.0.0.7",
                               kv_port=14600), dict(COMPAT, tp_size="2"), RankInfo(tp_size=2, dp_rank=1, dp_size=2))
    req = FakeRequest("p-1", list(range(4)), {"do_remote_decode": True})
    s.update_state_after_alloc(req, FakeBlocks([3]), 0)
    s.build_connector_meta(StepOutput([NewReq("p-1", ([3],))], num_scheduled_tokens={"p-1": 4}))
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    _, params = s.request_finished(req, [3])
    # DP engine 1 of TP 2: its ranks serve on 14602 and 14603
    assert (params["remote_port"], params["remote_tp_size"], params["remote_dp_index"]) == (14602, 2, 1)
    assert s.books() == EMPTY


@pytest.mark.parametrize("remote_tp,ok", [("1", True), ("2", True), ("4", True), ("3", False)])
def test_tp_sizes_that_cannot_pair_are_refused_naming_both_sides(remote_tp, ok, caplog):
    s = UcxScheduler(UcxConfig(is_producer=False, is_consumer=True, block_size=BS), dict(COMPAT, tp_size="2"))
    req = FakeRequest("d-1", list(range(8)), remote_params(8, compat=dict(COMPAT, tp_size=remote_tp),
                                                          remote_tp_size=int(remote_tp)))
    if ok:
        spec = start_load(s, req, [1, 2])
        assert spec.remote_tp_size == int(remote_tp) and spec.total_kv_heads == 2
        s.update_connector_output(WorkerReport(finished_recving={"d-1"}))
    else:
        assert s.get_num_new_matched_tokens(req, 0) == (0, False)
        assert f"tp_size: prefill='{remote_tp}' decode='2'" in caplog.text
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    s.request_finished(req, [1, 2])
    assert s.books() == EMPTY


def test_rma_producer_delays_the_free_and_releases_aborted_requests():
    s = UcxScheduler(UcxConfig(is_producer=True, is_consumer=False, block_size=BS, kv_port=14600, kv_mode="rma",
                               lease_s=9.0), dict(COMPAT))
    for rid, status in (("p-1", RequestStatus.FINISHED_LENGTH_CAPPED), ("p-2", RequestStatus.FINISHED_ABORTED)):
        req = FakeRequest(rid, list(range(4)), {"do_remote_decode": True}, status=status)
        s.update_state_after_alloc(req, FakeBlocks([1]), 0)
        assert len(s.build_connector_meta(StepOutput([NewReq(rid, ([1],))], num_scheduled_tokens={rid: 4})).to_save) == 1
        keep, params = s.request_finished(req, [1])
        assert keep is True  # the blocks stay leased until the worker reports the request sent
        if rid == "p-1":
            assert params["kv_mode"] == "rma" and params["lease_s"] == 9.0
        else:
            assert params is None and s.build_connector_meta(StepOutput()).release_leases == ["p-2"]
    assert s.books() == EMPTY
    # a request never saved is not held
    req = FakeRequest("p-3", list(range(4)), {"do_remote_decode": True}, status=RequestStatus.FINISHED_ABORTED)
    assert s.request_finished(req, [1]) == (False, None)


def test_rma_consumer_renews_the_lease_while_the_request_waits_for_blocks():
    import time

    s = consumer()
    req = FakeRequest("d-1", list(range(8)), remote_params(8, kv_mode="rma", lease_s=0.3, remote_tp_size=1))
    assert s.get_num_new_matched_tokens(req, 0) == (8, True)  # no blocks free yet: vLLM keeps it waiting
    assert s.build_connector_meta(StepOutput()).renew_leases == []  # not due yet
    time.sleep(0.12)
    renew = s.build_connector_meta(StepOutput()).renew_leases
    assert [(r.remote_request_id, r.remote_address) for r in renew] == [("p-1", "10.0.0.7:14600")]
    assert s.build_connector_meta(StepOutput()).renew_leases == []  # once per lease_s / 3
    assert s.get_num_new_matched_tokens(req, 0) == (8, True)
    s.update_state_after_alloc(req, FakeBlocks([1, 2]), 8)  # allocated: the load takes over
    meta = s.build_connector_meta(StepOutput())
    assert meta.to_load[0].kv_mode == "rma" and s.books()["waiting_rma"] == 0
    s.update_connector_output(WorkerReport(finished_recving={"d-1"}))
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    s.request_finished(req, [1, 2])
    assert s.books() == EMPTY


def test_retained_kv_is_acknowledged_when_the_answer_completes_not_on_abort():
    """Decode failover: prefill keeps the KV after the fetch; decode acknowledges it (the worker sends an
    abort to prefill) once the request completed, never when it was cut off (another decode may retry)."""
    p = UcxScheduler(UcxConfig(is_producer=True, is_consumer=False, block_size=BS, retain_kv=True), dict(COMPAT))
    req = FakeRequest("p-1", list(range(4)), {"do_remote_decode": True})
    p.update_state_after_alloc(req, FakeBlocks([1]), 0)
    p.build_connector_meta(StepOutput([NewReq("p-1", ([1],))], num_scheduled_tokens={"p-1": 4}))
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    assert p.request_finished(req, [1])[1]["retain_kv"] is True and p.books() == EMPTY
    s = consumer()
    for status, acked in ((RequestStatus.FINISHED_ABORTED, False), (RequestStatus.FINISHED_STOPPED, True)):
        req = FakeRequest("d-1", list(range(8)), remote_params(8, retain_kv=True, remote_tp_size=2))
        spec = start_load(s, req, [1, 2])
        assert spec.retain is True and s.books()["retained"] == 1
        s.update_connector_output(WorkerReport(finished_recving={"d-1"}))
        req.status = status
        assert s.request_finished(req, [1, 2]) == (False, None)
        acks = s.build_connector_meta(StepOutput()).ack_loads
        assert [(a.remote_request_id, a.remote_address, a.remote_tp_size) for a in acks] == (
            [("p-1", "10.0.0.7:14600", 2)] if acked else [])
        assert s.books() == EMPTY
    req = FakeRequest("d-2", list(range(8)), remote_params(8))  # prefill did not retain: nothing to acknowledge
    assert start_load(s, req, [1, 2]).retain is False
    s.update_connector_output(WorkerReport(finished_recving={"d-2"}))
    req.status = RequestStatus.FINISHED_STOPPED
    s.request_finished(req, [1, 2])
    assert s.build_connector_meta(StepOutput()).ack_loads == [] and s.books() == EMPTY


def test_retained_rma_lease_is_renewed_while_the_request_is_answered_then_acknowledged():
    """kv_mode rma with retain_kv: prefill says so; decode renews the lease after its load too (the blocks
    stay for a failover while it answers), stops at the finish, and acknowledges over the rma wire."""
    import time

    p = UcxScheduler(UcxConfig(is_producer=True, is_consumer=False, block_size=BS, kv_mode="rma", retain_kv=True),
                     dict(COMPAT))
    req = FakeRequest("p-1", list(range(4)), {"do_remote_decode": True})
    p.update_state_after_alloc(req, FakeBlocks([1]), 0)
    p.build_connector_meta(StepOutput([NewReq("p-1", ([1],))], num_scheduled_tokens={"p-1": 4}))
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    keep, params = p.request_finished(req, [1])
    assert keep is True and params["retain_kv"] is True and params["kv_mode"] == "rma" and p.books() == EMPTY
    s = consumer()
    for status, acked in ((RequestStatus.FINISHED_ABORTED, False), (RequestStatus.FINISHED_STOPPED, True)):
        req = FakeRequest("d-1", list(range(8)), remote_params(8, retain_kv=True, kv_mode="rma", lease_s=0.3))
        spec = start_load(s, req, [1, 2])
        assert spec.retain is True and spec.kv_mode == "rma"
        s.update_connector_output(WorkerReport(finished_recving={"d-1"}))
        time.sleep(0.12)  # loaded and answering: the lease is still renewed every lease_s / 3
        renew = s.build_connector_meta(StepOutput()).renew_leases
        assert [(r.remote_request_id, r.kv_mode) for r in renew] == [("p-1", "rma")]
        req.status = status
        assert s.request_finished(req, [1, 2]) == (False, None)
        time.sleep(0.12)
        meta = s.build_connector_meta(StepOutput())
        assert meta.renew_leases == []  # finished: no more renewals (a dead decode's lease ends the same way)
        assert [(a.remote_request_id, a.kv_mode) for a in meta.ack_loads] == ([("p-1", "rma")] if acked else [])
        assert s.books() == EMPTY
