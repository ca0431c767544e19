"""LookupBuffer tests: pure logic in-process (no UCX), then producer/consumer processes over real pipes."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from kv_transfer import (
    BufferFullError,
    EntryTooLargeError,
    KVTransferError,
    KVUsageError,
    LookupBuffer,
    LookupProtocolError,
    WireVersionError,
)
from kv_transfer import _lookup_wire as wire
from tests import kv_peers as K


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def toks(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int64)


# -- matching ------------------------------------------------------------------------
def test_exact_match_returns_entry_and_drops_it():
    buf = LookupBuffer(1 << 20)
    k = torch.randn(4)
    buf.insert(toks(1, 2, 3), None, k, None, None)
    got = buf.drop_select(toks(1, 2, 3), None)
    assert got[2] is k and got[3] is None and got[4] is None  # the stored tensor itself
    assert buf.drop_select(toks(1, 2, 3), None) == [None] * 5
    assert buf.bytes_used == 0 and buf.num_entries == 0


def test_roi_masks_tokens_on_both_sides():
    buf = LookupBuffer(1 << 20)
    buf.insert(toks(1, 2, 3, 9), torch.tensor([1, 1, 1, 0], dtype=torch.bool), torch.ones(1), None, None)
    assert buf.drop_select(toks(1, 2, 3, 4), None)[0] is None  # unmasked query differs
    got = buf.drop_select(toks(7, 1, 2, 3), torch.tensor([False, True, True, True]))
    assert got[0] is not None and got[1] is not None


def test_no_match_waits_the_bounded_time_then_gives_nones():
    buf = LookupBuffer(1 << 20)
    t0 = time.monotonic()
    assert buf.drop_select(toks(5), None, wait_s=0.3) == [None] * 5
    assert 0.28 <= time.monotonic() - t0 < 2


def test_waiting_select_sees_a_later_insert():
    buf = LookupBuffer(1 << 20)
    threading.Timer(0.1, lambda: buf.insert(toks(8), None, torch.ones(2), None, None)).start()
    got = buf.drop_select(toks(8), None, wait_s=5)
    assert got[2] is not None


def test_longest_prefix_match_reports_matched_tokens():
    buf = LookupBuffer(1 << 20)
    buf.insert(toks(1, 2, 3, 4, 5), None, torch.zeros(1), None, None, request_id="long")
    buf.insert(toks(1, 2, 9), None, torch.zeros(1), None, None, request_id="short")
    assert buf.fetch(toks(1, 2, 3, 7), None) is None  # exact only by default
    m = buf.fetch(toks(1, 2, 3, 7), None, prefix=True)
    assert m.request_id == "long" and m.matched == 3
    assert buf.fetch(toks(4, 4), None, prefix=True) is None  # nothing shared
    assert buf.fetch(toks(1, 2, 9, 9), None, prefix=True, min_prefix=4) is None
    assert buf.fetch(toks(1, 2, 9, 9), None, prefix=True).matched == 3


def test_request_id_scopes_entries():
    buf = LookupBuffer(1 << 20)
    buf.insert(toks(1, 2), None, torch.zeros(1), None, None, request_id="a")
    buf.insert(toks(1, 2), None, torch.ones(1), None, None, request_id="b")
    assert buf.fetch(toks(1, 2), None, request_id="c") is None
    assert buf.fetch(toks(1, 2), None, request_id="b").key.item() == 1
    assert buf.fetch(None, None, request_id="a").key.item() == 0
    with pytest.raises(KVUsageError, match="needs input_tokens or a request_id"):
        buf.fetch(None, None)


def test_duplicates_are_served_in_insertion_order():
    buf = LookupBuffer(1 << 20)
    for i in range(3):
        buf.insert(toks(4), None, torch.tensor([i]), None, None)
    assert [buf.drop_select(toks(4), None)[2].item() for _ in range(3)] == [0, 1, 2]


def test_parts_may_be_lists_and_bytes_are_counted():
    buf = LookupBuffer(1 << 20)
    layers = [torch.zeros(10), torch.zeros(6, dtype=torch.float16)]
    buf.insert(toks(1, 2), None, layers, torch.zeros(3, dtype=torch.int8), torch.zeros(2))
    assert buf.bytes_used == 2 * 8 + 40 + 12 + 3 + 8
    with pytest.raises(KVUsageError, match=r"key\[1\]"):
        buf.insert(toks(3), None, [torch.zeros(1), "x"], None, None)
    with pytest.raises(KVUsageError, match="integer token ids"):
        buf.insert(torch.zeros(2), None, None, None, None)


# -- capacity and back-pressure ----------------------------------------------------
def test_entry_larger_than_capacity_is_refused_at_once():
    buf = LookupBuffer(100)
    with pytest.raises(EntryTooLargeError, match="can never fit"):
        buf.insert(toks(1), None, torch.zeros(100), None, None)


def test_full_buffer_insert_times_out_with_a_clear_error():
    buf = LookupBuffer(100)
    buf.insert(None, None, torch.zeros(20), None, None, request_id="a")  # 80 bytes
    t0 = time.monotonic()
    with pytest.raises(BufferFullError, match=r"80/100 bytes held by 1 entries") as ei:
        buf.insert(None, None, torch.zeros(10), None, None, request_id="b", timeout=0.2)
    assert isinstance(ei.value, KVTransferError) and 0.18 <= time.monotonic() - t0 < 2


def test_full_buffer_insert_proceeds_when_a_consumer_drains():
    buf = LookupBuffer(100)
    buf.insert(None, None, torch.zeros(20), None, None, request_id="a")
    threading.Timer(0.2, lambda: buf.fetch(None, None, request_id="a")).start()
    t0 = time.monotonic()
    buf.insert(None, None, torch.zeros(20), None, None, request_id="b", timeout=5)
    assert 0.15 <= time.monotonic() - t0 < 3 and buf.bytes_used == 80


# -- leases, claims, abort ---------------------------------------------------------
def test_lease_expiry_drops_unclaimed_entries():
    clock = FakeClock()
    buf = LookupBuffer(1 << 20, lease_s=10, clock=clock)
    buf.insert(toks(1), None, torch.zeros(4), None, None)
    buf.insert(toks(2), None, torch.zeros(4), None, None, lease_s=100)
    clock.t += 11
    assert buf.num_entries == 1 and buf.expired == 1
    assert buf.drop_select(toks(1), None)[0] is None
    clock.t += 100
    assert buf.bytes_used == 0


def test_claimed_entry_is_invisible_and_survives_its_lease_until_released():
    clock = FakeClock()
    buf = LookupBuffer(1 << 20, lease_s=1, clock=clock)
    buf.insert(toks(1), None, torch.zeros(4), None, None)
    handle, m = buf.claim(toks(1), None)
    assert buf.fetch(toks(1), None) is None
    clock.t += 5
    assert buf.num_entries == 1  # memory still being sent
    buf.release(handle)
    buf.release(handle)  # idempotent
    assert buf.bytes_used == 0


def test_unclaim_after_a_failed_send_makes_it_available_until_the_lease_ends():
    clock = FakeClock()
    buf = LookupBuffer(1 << 20, lease_s=1, clock=clock)
    buf.insert(toks(1), None, torch.zeros(4), None, None)
    handle, _ = buf.claim(toks(1), None)
    buf.unclaim(handle)
    handle, _ = buf.claim(toks(1), None)
    clock.t += 5
    buf.unclaim(handle)
    assert buf.bytes_used == 0 and buf.expired == 1


def test_leases_of_many_entries_expire_in_deadline_order_after_most_were_consumed():
    # the leases are a heap (a claim looks at the due entries only); consuming most entries makes it
    # rebuild itself from the live ones, which must keep every remaining lease, a busy one's included
    clock = FakeClock()
    buf = LookupBuffer(1 << 24, lease_s=1000, clock=clock)
    for i in range(600):
        buf.insert(toks(i), None, torch.zeros(1), None, None, lease_s=10 + (i % 7) * 10)
    for i in range(600):
        if i % 50:
            assert buf.fetch(toks(i), None) is not None
    left = [i for i in range(600) if i % 50 == 0]
    handle, _ = buf.claim(toks(left[0]), None)  # lease 10, past it while its send is in flight
    for step in range(1, 8):
        clock.t = 1000.0 + step * 10
        want = [i for i in left if 10 + (i % 7) * 10 > step * 10 or i == left[0]]
        assert buf.num_entries == len(want), step
    buf.unclaim(handle)  # the hand-over failed: past its lease, so it goes now
    assert buf.num_entries == 0 and buf.expired == len(left)


def test_lease_heap_keeps_a_live_head_and_stays_bounded_whatever_order_entries_go_in():
    # a claim's lease check is one comparison only because releases pop freed entries off the heap's
    # head and rebuild it once freed entries pile up deeper; expiry must still see every live lease
    import random

    clock = FakeClock()
    buf = LookupBuffer(1 << 24, lease_s=1000, clock=clock)
    for i in range(400):
        buf.insert(toks(i), None, torch.zeros(1), None, None, lease_s=10 + (i % 9) * 10)
    order = list(range(400))
    random.Random(7).shuffle(order)
    gone = set(order[:300])
    for n, i in enumerate(order[:300]):
        assert buf.fetch(toks(i), None) is not None
        heap, live = buf._leases, buf._entries
        assert not heap or heap[0][1] in live, n  # the head is a live entry
        assert len(heap) <= 2 * len(live) + 64, n  # freed entries never pile up beyond the rebuild bound
    left = [i for i in range(400) if i not in gone]
    for step in range(1, 10):
        clock.t = 1000.0 + step * 10
        assert buf.num_entries == sum(1 for i in left if 10 + (i % 9) * 10 > step * 10), step
    assert buf.num_entries == 0 and buf.expired == len(left)


def test_abort_drops_available_and_claimed_entries():
    buf = LookupBuffer(1 << 20)
    buf.insert(toks(1), None, torch.zeros(4), None, None, request_id="r")
    buf.insert(toks(2), None, torch.zeros(4), None, None, request_id="r")
    handle, _ = buf.claim(toks(1), None)
    assert buf.abort("r") == 2
    assert buf.num_entries == 1  # the claimed one goes when its send ends
    buf.unclaim(handle)
    assert buf.bytes_used == 0 and buf.abort("r") == 0


def test_close_twice_releases_once_and_refuses_inserts():
    buf = LookupBuffer(1 << 20)
    buf.insert(toks(1), None, torch.zeros(4), None, None)
    buf.close()
    buf.close()
    assert buf.bytes_used == 0
    with pytest.raises(KVUsageError, match="closed"):
        buf.insert(toks(1), None, torch.zeros(4), None, None)


# -- wire ------------------------------------------------------------------------------
def test_wire_roundtrip_and_version_check():
    f = wire.encode(wire.Fetch(3, "rid", True, 2, 1.5))
    assert wire.decode_request(f, 2, "peer") == wire.Fetch(3, "rid", True, 2, 1.5)
    with pytest.raises(LookupProtocolError, match="announces 3 tensors; it carries 2"):
        wire.decode_request(f, 3, "peer")  # the envelope's count must be the request type's
    bad = bytearray(f)
    bad[4] = 7
    with pytest.raises(WireVersionError, match=rf"peer speaks v7, we speak v{wire.WIRE_VERSION}"):
        wire.decode_request(bytes(bad), 2, "peer")
    with pytest.raises(LookupProtocolError, match="magic"):
        wire.decode_request(bytes(20), 0, "peer")
    with pytest.raises(LookupProtocolError, match="malformed lookup answer from peer"):
        wire.decode_response(f, "peer")  # a request is no answer
    codes, flat = wire.flatten_parts([None, torch.zeros(1), [torch.ones(1), torch.ones(2)]])
    assert codes == [-1, -2, 2] and wire.count_parts(codes) == 3
    parts = wire.unflatten_parts(codes, flat, "peer")
    assert parts[0] is None and parts[1] is flat[0] and len(parts[2]) == 2


# -- across processes ------------------------------------------------------------------
def test_remote_no_match_roi_prefix_version_and_lease(peers):
    prod = peers.start(K.misc_producer)
    addr = peers.expect(prod, "addr", 60)
    cons = peers.start(K.misc_consumer, addr)
    out = peers.expect(cons, "ok", 60)
    assert out["nomatch"] == [None] * 5 and 0.5 <= out["nomatch_s"] < 3
    assert out["stats0"]["num_entries"] == 3 and out["stats0"]["bytes_used"] > 4000
    assert out["roi_key_sum"] == 100.0
    assert out["prefix_matched"] == 10 and out["prefix_key"] == [[7.0, 7.0], [8.0, 8.0]]
    assert out["prefix_hidden"] == "torch.bfloat16"
    assert out["version"].startswith("ErrorReply version:") and f"peer speaks v99, we speak v{wire.WIRE_VERSION}" in out["version"]
    assert out["stats_end"]["bytes_used"] == 0 and out["stats_end"]["num_entries"] == 0
    res = peers.expect(prod, "ok", 30)
    assert res["done"] and res["expired"] == 1 and res["served"] == 2


def test_consumer_killed_mid_fetch_producer_survives_and_lease_frees_entry(peers):
    prod = peers.start(K.kill_producer)
    addr = peers.expect(prod, "addr", 60)
    victim = peers.start(K.hanging_consumer, addr)
    peers.expect(victim, "sent", 60)
    time.sleep(0.5)  # the producer is now blocked sending 8 MiB nobody receives
    os.kill(victim.pid, signal.SIGKILL)
    other = peers.start(K.other_consumer, addr)
    got = peers.expect(other, "ok", 60)
    assert got["got_other"] is True and got["stats"]["bytes_used"] == 0, got
    res = peers.expect(prod, "ok", 40)
    assert res["done"] and res["failed_sends"] == 1 and res["expired"] == 1 and res["bytes_used"] == 0


def test_redialling_client_reaches_a_restarted_producer_a_plain_one_stays_broken(peers):
    from bench._ports import free_port
    from kv_transfer import LookupClient, PeerUnavailableError

    port = free_port()
    first = peers.start(K.fixed_port_producer, port, 1.0)
    addr = peers.expect(first, "addr", 60)
    kw = dict(timeout_s=10, peer_timeout_s=2.0, heartbeat_s=0.2)
    plain, redial = LookupClient(addr, **kw), LookupClient(addr, redial=True, **kw)
    try:
        assert float(redial.fetch(request_id="r1").key[0]) == 1.0
        os.kill(first.pid, signal.SIGKILL)
        second = peers.start(K.fixed_port_producer, port, 2.0)
        assert peers.expect(second, "addr", 60) == addr
        m = redial.fetch(request_id="r2")  # the old connection fails; the client dials the new producer
        assert m is not None and float(m.key[0]) == 2.0 and redial.redials == 1
        for _ in range(2):  # without redial: broken, and stays so
            with pytest.raises(PeerUnavailableError, match=addr.replace(".", r"\.")):
                plain.fetch(request_id="r2")
    finally:
        plain.close()
        redial.close()


def test_full_buffer_three_concurrent_consumers_back_pressure_no_deadlock(peers):
    prod = peers.start(K.full_producer)
    addr = peers.expect(prod, "addr", 60)
    cons = [peers.start(K.drain_consumer, addr, k) for k in range(K.N_CONSUMERS)]
    for c in cons:
        assert peers.expect(c, "ok", 90)["bad"] == []
    res = peers.expect(prod, "ok", 60)
    assert res["done"] and res["served"] == K.N_CONSUMERS * K.PER_CONSUMER
    assert res["max_used"] <= res["capacity"] and res["max_wait"] > 0.01  # insert did block
    assert res["bytes_used"] == 0 and res["num_entries"] == 0


# -- shared entries and narrowed keys (tensor parallelism) ------------------------------
def test_shared_entry_is_dropped_after_its_last_reader_and_narrow_cuts_the_key():
    clock = FakeClock()
    buf = LookupBuffer(1 << 20, lease_s=10, clock=clock)
    key = [torch.arange(24.0).reshape(2, 3, 4), torch.arange(24.0).reshape(2, 3, 4) + 100]
    buf.insert(toks(1, 2), None, key, None, None, request_id="r")
    h1, _ = buf.claim(toks(1, 2), None, request_id="r", readers=3)
    m2 = buf.fetch(toks(1, 2), None, request_id="r", narrow=[1, 1, 2])  # readers of later claims are ignored
    assert [tuple(t.shape) for t in m2.key] == [(2, 2, 4)] * 2 and torch.equal(m2.key[1], key[1][:, 1:3])
    clock.t += 11  # past the lease, but a send is in flight: nothing is dropped
    assert buf.num_entries == 1
    buf.release(h1)
    assert buf.num_entries == 0 and buf.expired == 1  # the third reader never came: the lease ended it
    buf.insert(toks(3), None, key, None, None, request_id="s")
    handle, _ = buf.claim(toks(3), None, readers=2)
    buf.unclaim(handle)  # a failed hand-over gives its read back: two more fetches find it
    assert buf.fetch(toks(3), None) is not None and buf.fetch(toks(3), None) is not None
    assert buf.fetch(toks(3), None) is None and buf.bytes_used == 0


def test_bad_readers_or_narrow_are_refused_and_leave_the_entry():
    buf = LookupBuffer(1 << 20)
    buf.insert(toks(1), None, [torch.zeros(2, 3)], None, None)
    for bad in (0, -1, 1 << 20, True, 1.5):
        with pytest.raises(KVUsageError, match="readers"):
            buf.fetch(toks(1), None, readers=bad)
    for bad in ([0, 0], [5, 0, 1], [1, 2, 2], [1, 0, 0], ["a", 0, 1]):
        with pytest.raises(KVUsageError, match="narrow"):
            buf.fetch(toks(1), None, narrow=bad)
    assert buf.num_entries == 1 and buf.fetch(toks(1), None).key[0].shape == (2, 3)


def test_remote_narrow_and_readers_over_the_wire():
    from kv_transfer import ProducerError

    buf = LookupBuffer(1 << 20)
    key = [torch.arange(48.0).reshape(2, 4, 6)]
    buf.insert(toks(1, 2), None, key, None, None, request_id="r")
    with buf.serve("127.0.0.1", 0) as server, LookupBuffer.connect(server.address, timeout_s=10) as client:
        with pytest.raises(ProducerError, match=r"bad_query.*narrow \[1, 3, 2\] does not fit tensor 0 of shape"):
            client.fetch(toks(1, 2), None, request_id="r", narrow=[1, 3, 2], readers=2)
        assert buf.num_entries == 1
        halves = [client.fetch(toks(1, 2), None, request_id="r", narrow=[1, i * 2, 2], readers=2) for i in (0, 1)]
        assert torch.equal(torch.cat([h.key[0] for h in halves], dim=1), key[0])
        # both readers served: dropped (the server releases once its send completed, just after we hold the data)
        deadline = time.monotonic() + 10
        while buf.bytes_used and time.monotonic() < deadline:
            time.sleep(0.01)
        assert buf.bytes_used == 0
        with pytest.raises(KVUsageError, match="readers"):
            client.fetch(toks(1, 2), None, readers=0)
    assert wire.decode_request(wire.encode(wire.Fetch(1, "r", narrow=[1, 0, 2], readers=2)), 2, "p").readers == 2


def test_remote_exact_match_gives_the_query_tokens_back_without_sending_them():
    # wire v3: where the entry's tokens are the query's (exact match, no roi, same dtype and shape) the
    # answer carries None in their place; anything else still sends the stored tokens
    buf = LookupBuffer(1 << 20)
    key = torch.arange(6.0)
    buf.insert(toks(1, 2, 3), None, key, None, None, request_id="a")
    buf.insert(toks(1, 2, 3).to(torch.int32), None, key, None, None, request_id="b")  # same values, other dtype
    buf.insert(toks(4, 5).reshape(1, 2), None, key, None, None, request_id="c")  # same values, other shape
    buf.insert(toks(7, 8, 9), None, key, None, None, request_id="d")
    buf.insert(toks(6, 6), torch.tensor([True, False]), key, None, None, request_id="e")
    with buf.serve("127.0.0.1", 0) as server, LookupBuffer.connect(server.address, timeout_s=10) as client:
        q = toks(1, 2, 3)
        m = client.fetch(q, None, request_id="a")
        assert m.input_tokens is q and torch.equal(m.key, key) and m.matched == 3  # not sent back: its own
        m = client.fetch(toks(1, 2, 3), None, request_id="b")
        assert m.input_tokens.dtype == torch.int32 and m.input_tokens.tolist() == [1, 2, 3]
        m = client.fetch(toks(4, 5), None, request_id="c")
        assert m.input_tokens.shape == (1, 2) and m.input_tokens.tolist() == [[4, 5]]
        q = toks(7, 8, 9, 10)
        m = client.fetch(q, None, prefix=True, request_id="d")  # a prefix match: the stored tokens
        assert m.input_tokens is not q and m.input_tokens.tolist() == [7, 8, 9] and m.matched == 3
        m = client.fetch(toks(6, 5), torch.tensor([True, False]), request_id="e")  # a roi: the stored ones
        assert m.input_tokens.tolist() == [6, 6] and m.roi.tolist() == [True, False]
    assert buf.num_entries == 0


# -- retained entries (decode failover) --------------------------------------------------
def test_retained_entry_survives_fetches_until_abort_acknowledges_it():
    clock = FakeClock()
    buf = LookupBuffer(1 << 20, lease_s=10, clock=clock)
    buf.insert(toks(1, 2), None, [torch.arange(4.0)], None, None, request_id="r", retain=True)
    first = buf.fetch(toks(1, 2), None, request_id="r", readers=2)  # readers do not count for a retained entry
    again = buf.fetch(toks(1, 2), None, request_id="r")  # a second decode after the first died
    assert torch.equal(first.key[0], again.key[0]) and buf.num_entries == 1
    handle, _ = buf.claim(toks(1, 2), None, request_id="r")  # a read in flight when the ack comes
    assert buf.abort("r") == 1 and buf.num_entries == 1
    assert buf.fetch(toks(1, 2), None, request_id="r") is None  # acknowledged: invisible at once
    buf.release(handle)
    assert buf.num_entries == 0 and buf.bytes_used == 0 and buf.expired == 0


def test_retained_entry_is_bounded_by_its_lease_from_insert_and_by_close():
    clock = FakeClock()
    buf = LookupBuffer(1 << 20, lease_s=10, clock=clock)
    buf.insert(toks(1), None, torch.zeros(4), None, None, retain=True)
    clock.t += 6
    handle, _ = buf.claim(toks(1), None)
    buf.unclaim(handle)  # a failed hand-over: still there
    assert buf.fetch(toks(1), None) is not None  # fetching does not renew the lease
    handle, _ = buf.claim(toks(1), None)
    clock.t += 6  # past the lease while a read is in flight: kept until that read ends
    assert buf.num_entries == 1
    buf.release(handle)
    assert buf.num_entries == 0 and buf.expired == 1
    buf.insert(toks(2), None, torch.zeros(4), None, None, retain=True)
    handle, _ = buf.claim(toks(2), None)
    buf.close()
    buf.close()
    assert buf.num_entries == 1  # read in flight
    buf.unclaim(handle)
    assert buf.num_entries == 0 and buf.bytes_used == 0


def test_retained_entry_over_the_wire_two_consumers_then_the_acknowledgement():
    buf = LookupBuffer(1 << 20)
    key = [torch.arange(12.0).reshape(3, 4)]
    buf.insert(toks(5, 6, 7), None, key, None, None, request_id="r", retain=True)
    with buf.serve("127.0.0.1", 0) as server:
        for _ in range(2):  # the first decode, then the one taking over
            with LookupBuffer.connect(server.address, timeout_s=10) as client:
                assert torch.equal(client.fetch(toks(5, 6, 7), None, request_id="r").key[0], key[0])
        assert buf.num_entries == 1
        with LookupBuffer.connect(server.address, timeout_s=10) as client:
            assert client.abort("r") == 1
            assert client.fetch(toks(5, 6, 7), None, request_id="r") is None
    assert buf.bytes_used == 0
