"""Connector mode ``rma`` below the engine: real UcxWorkers (prefill, decode) over real UCX on loopback.

Bit-exact GET of prefill's leased blocks into decode's own blocks (prefix-cached
ones skipped) and the lease then freed; lease expiry frees the blocks and the late
load fails; a reader killed mid-read frees them; a producer killed mid-read is a
load error; hostile or stale descriptors are errors, never reads of other memory;
decode renews a lease while it waits. Tensor parallelism in rma mode is covered by
tests/test_vllm_worker.py's TP test (parametrized over kv_mode).
"""

from __future__ import annotations

import signal
import time

import pytest
import torch

pytest.importorskip("vllm")

from kv_transfer.paged import PagedLayout  # noqa: E402
from kv_transfer.rma_kv import Claimed, Geometry, RmaKVClient, RmaKVServer, block_pieces  # noqa: E402
from kv_transfer.vllm import LoadSpec, SaveSpec, UcxConfig, UcxConnectorMetadata, UcxWorker  # noqa: E402
from kv_transfer.vllm.rma_worker import choose_kv_mode  # noqa: E402
from tests import rma_kv_peers  # noqa: E402
from tests.test_vllm_worker import BS, _finish, worker_pair  # noqa: E402
from transport import register  # noqa: E402

TOKENS = list(range(10))


def _rma_load(rid: str, addr: str, blocks: list[int], skip: int = 0, tokens: list[int] = TOKENS) -> UcxConnectorMetadata:
    return UcxConnectorMetadata(to_load=[LoadSpec(rid, "p1", addr, list(tokens), len(tokens), blocks, skip,
                                                  kv_mode="rma")])


def _sent(prod: UcxWorker, rid: str, timeout: float) -> float:
    """Seconds until ``prod`` reports ``rid`` in finished_sending (its blocks freed)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        send, _ = prod.get_finished()
        if send and rid in send:
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"producer did not free {rid} within {timeout}s")


@pytest.fixture
def pair():
    yield from worker_pair(lease_s=1.5, kv_mode="rma")


def test_kv_mode_choice():
    cfg = dict(is_producer=True, is_consumer=False)
    assert choose_kv_mode(UcxConfig(**cfg))[0] == "stage"
    assert choose_kv_mode(UcxConfig(kv_mode="rma", **cfg))[0] == "rma"
    mode, why = choose_kv_mode(UcxConfig(kv_mode="auto", ucx_tls="tcp", **cfg))
    assert mode == "rma" and "UCX_TLS=tcp" in why and "TCP" in why  # measured: rma ahead over TCP too
    mode, why = choose_kv_mode(UcxConfig(kv_mode="auto", ucx_tls="sm,self", **cfg))
    assert mode == "rma" and "shared memory" in why
    with pytest.raises(Exception, match="kv_mode 'zero' is not one of stage, rma, auto"):
        choose_kv_mode(UcxConfig(kv_mode="zero", **cfg))


def test_block_pieces_vllm_cpu_and_flash_attn_planes():
    """vllm_cpu: one piece per block (head ranges too); flash_attn: a K and a V piece per block."""
    cpu = Geometry.of(torch.empty(8, 4, BS, 16), 0)
    off, n = block_pieces(cpu, [3, 1])
    assert off.tolist() == [3 * 4 * BS * 16 * 4, 1 * 4 * BS * 16 * 4] and n == 4 * BS * 16 * 4
    off, n = block_pieces(cpu, [3], heads=(1, 2), head_dim=1)
    assert off.tolist() == [(3 * 4 + 1) * BS * 16 * 4] and n == 2 * BS * 16 * 4
    fa = torch.randn(2, 8, BS, 4, 16)  # (K|V, blocks, block_size, heads, head_size)
    g = Geometry.of(fa, 1)
    off, n = block_pieces(g, [5])
    assert off.tolist() == [5 * BS * 64 * 4, (8 + 5) * BS * 64 * 4] and n == BS * 64 * 4
    with pytest.raises(Exception, match="heads follow the block dim"):
        block_pieces(g, [5], heads=(0, 2), head_dim=3)
    with pytest.raises(Exception, match="out of range"):
        block_pieces(g, [8])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_flash_attn_k_and_v_planes_are_read_in_place(device):
    """A server of flash_attn caches (K and V planes), a reader GETs two blocks (one prefix-cached, skipped)."""
    src = [torch.randn(2, 8, BS, 4, 16, device=device) for _ in range(2)]
    dst = [torch.zeros(2, 8, BS, 4, 16, device=device) for _ in range(2)]
    server = RmaKVServer(src, PagedLayout.flash_attn(), lease_s=30)
    client = RmaKVClient(server.address, dst, [register(t) for t in dst], PagedLayout.flash_attn(), timeout_s=10)
    try:
        server.offer("p1", TOKENS, [6, 2, 7])
        res = client.load("p1", TOKENS, [0, 4, 1], skip_blocks=1)
        assert res.ok, res.error
        assert res.nbytes == 2 * 2 * 2 * BS * 64 * 4  # layers x blocks x (K, V) pieces
        for s, d in zip(src, dst):
            assert torch.equal(d[:, [4, 1]], s[:, [2, 7]]) and not d[:, 0].any()
        assert server.num_leases == 0
    finally:
        client.close()
        server.close()


def test_rma_load_is_bit_exact_skips_cached_blocks_and_frees_the_lease(pair):
    prod, cons, src, dst, addr = pair
    before = {k: v.clone() for k, v in dst.items()}
    prod.wait_for_save(UcxConnectorMetadata(to_save=[SaveSpec("p1", TOKENS, [5, 1, 2])]))
    assert prod._rma.server.num_leases == 1 and prod._buffer is None  # nothing staged
    cons.start_load_kv(_rma_load("d1", addr, [0, 3, 4], skip=1))
    assert _finish(cons, "d1") == (set(), set())
    for name in src:
        assert torch.equal(dst[name][[3, 4]], src[name][[1, 2]])
        assert torch.equal(dst[name][0], before[name][0])  # the prefix-cached block is not written
    assert _sent(prod, "p1", 2.0) < 1.0  # freed on decode's Done, well before the 1.5 s lease
    totals = cons.counters.totals()
    assert totals["requests_loaded"] == 1 and totals["load_failures"] == 0 and totals["bytes_loaded"] > 0
    # wrong tokens for a held request: refused, every wanted block failed
    prod.wait_for_save(UcxConnectorMetadata(to_save=[SaveSpec("p1", TOKENS, [5, 1, 2])]))
    cons.start_load_kv(_rma_load("d2", addr, [6, 7], tokens=[9] * 10))
    assert _finish(cons, "d2") == (set(), {6, 7})
    # an aborted request's lease is released at once
    prod.wait_for_save(UcxConnectorMetadata(release_leases=["p1"]))
    assert _sent(prod, "p1", 1.0) < 0.5 and prod._rma.server.num_leases == 0


def test_lease_expiry_frees_blocks_and_the_late_load_fails(pair):
    prod, cons, src, dst, addr = pair
    prod.wait_for_save(UcxConnectorMetadata(to_save=[SaveSpec("p1", TOKENS, [5, 1, 2])]))
    assert 1.3 < _sent(prod, "p1", 5.0) < 3.0  # the 1.5 s lease, nobody came
    cons.start_load_kv(_rma_load("d1", addr, [0, 3, 4], skip=1))
    assert _finish(cons, "d1") == (set(), {3, 4})
    assert cons.counters.totals()["load_failures"] == 1


def test_reader_killed_mid_read_frees_the_blocks(peers):
    freed: list[str] = []
    server = RmaKVServer(rma_kv_peers.caches(1), PagedLayout.vllm_cpu(), lease_s=60, on_free=freed.append,
                         heartbeat_s=0.2, peer_timeout_s=2.0)
    try:
        server.offer("p1", TOKENS, [5, 1, 2])
        rd = peers.start(rma_kv_peers.reader_killed_after_claim, server.address, "p1", TOKENS)
        assert peers.expect(rd, "claimed") is True
        t0 = time.monotonic()
        while not freed and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        assert freed == ["p1"] and server.num_leases == 0  # long before the 60 s lease
    finally:
        server.close()


def test_producer_killed_after_claim_is_a_load_error(peers):
    """The producer dies once it has bound the lease: the read is an error naming it, not a hang.

    The reader waits for the death before posting its GETs (``after_claim``): a 4 MiB read
    over shared memory ends in about a millisecond, so a death "somewhere during the read"
    raced the read and sometimes lost (CI saw ``ok=True``).
    """
    num_blocks = 64  # 2 layers x 64 blocks x 8 heads x 4 tokens x 256 floats x 4 B: 4 MiB to GET
    pr = peers.start(rma_kv_peers.producer_killed_after_claim, num_blocks)
    addr = peers.expect(pr, "addr")
    dst = rma_kv_peers.caches(2, num_blocks=num_blocks, heads=8, width=256)
    client = RmaKVClient(addr, dst, [register(t) for t in dst], PagedLayout.vllm_cpu(), timeout_s=10)
    try:
        t0 = time.monotonic()
        res = client.load("p1", TOKENS, list(range(num_blocks)), after_claim=lambda: pr.join(10))
        assert pr.exitcode == -signal.SIGKILL
        assert not res.ok and time.monotonic() - t0 < 15
        assert addr.split(":")[-1] in res.error or "Peer" in res.error or "lease" in res.error, res.error
    finally:
        client.close()


def test_hostile_and_stale_descriptors_are_errors(pair):
    prod, cons, src, dst, addr = pair
    server = prod._rma.server
    # block ids outside the producer's caches: refused before anything is posted
    server.offer("p1", TOKENS, [5, 1, 99])
    cons.start_load_kv(_rma_load("d1", addr, [0, 3, 4]))
    assert _finish(cons, "d1") == (set(), {0, 3, 4})
    # a geometry claiming more memory than registered: the transport's bounds check refuses the pieces
    before = {k: v.clone() for k, v in dst.items()}
    server._layers = [type(li)(li.descriptor, [800] + li.shape[1:], li.stride, li.itemsize, li.dtype)
                      for li in server._layers]
    server.offer("p2", TOKENS, [700, 1])
    cons._rma._clients.clear()  # a fresh reader fetches the lying geometry
    cons.start_load_kv(UcxConnectorMetadata(to_load=[LoadSpec("d2", "p2", addr, TOKENS, 10, [0, 3], 0,
                                                               kv_mode="rma")]))
    assert _finish(cons, "d2") == (set(), {0, 3})
    assert all(torch.equal(dst[k], before[k]) for k in dst)
    # a deregistered (stale) cache: the liveness check fails, nothing is returned as valid
    server._regs[0].close()
    server.offer("p3", TOKENS, [5, 1])
    cons._rma._clients.clear()
    cons.start_load_kv(UcxConnectorMetadata(to_load=[LoadSpec("d3", "p3", addr, TOKENS, 10, [6, 7], 0,
                                                               kv_mode="rma")]))
    assert _finish(cons, "d3") == (set(), {6, 7})


def test_renewed_lease_outlives_a_decode_backlog(pair):
    """Decode renews (through its step metadata) while the request waits: the late load still succeeds."""
    from kv_transfer.vllm.metadata import RenewSpec

    prod, cons, src, dst, addr = pair
    prod.wait_for_save(UcxConnectorMetadata(to_save=[SaveSpec("p1", TOKENS, [5, 1, 2])]))
    for _ in range(6):  # 3 s of backlog against a 1.5 s lease
        cons.start_load_kv(UcxConnectorMetadata(renew_leases=[RenewSpec("p1", addr)]))
        time.sleep(0.5)
    assert prod._rma.server.num_leases == 1 and prod.get_finished()[0] is None
    cons.start_load_kv(_rma_load("d1", addr, [0, 3, 4]))
    assert _finish(cons, "d1") == (set(), set())
    for name in src:
        assert torch.equal(dst[name][[0, 3, 4]], src[name][[5, 1, 2]])
    assert _sent(prod, "p1", 1.0) < 0.5


def _wait(cond, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what} not within {timeout}s")
        time.sleep(0.02)
    return time.monotonic() - t0


def test_retained_lease_outlives_dead_readers_serves_identical_bytes_and_goes_on_ack(peers):
    """retain (decode failover): a reader killed mid-read and one killed after its read free nothing; a
    third reads the same bytes; its acknowledgement frees the blocks (once)."""
    freed: list[str] = []
    src = rma_kv_peers.caches(1)
    server = RmaKVServer(src, PagedLayout.vllm_cpu(), lease_s=60, on_free=freed.append, retain=True,
                         heartbeat_s=0.2, peer_timeout_s=2.0)
    dst = rma_kv_peers.caches(3)
    client = RmaKVClient(server.address, dst, [register(t) for t in dst], PagedLayout.vllm_cpu(), timeout_s=10)
    try:
        server.offer("p1", TOKENS, [5, 1, 2])
        first = peers.start(rma_kv_peers.reader_killed_after_claim, server.address, "p1", TOKENS)
        assert peers.expect(first, "claimed") is True
        second = peers.start(rma_kv_peers.reader_killed_after_read, server.address, "p1", TOKENS, [0, 3, 4])
        ok, error, read = peers.expect(second, "read")
        assert ok, error
        for p in (first, second):
            p.join(10)
            assert p.exitcode == -signal.SIGKILL
        _wait(lambda: not server._pipes, 10, "the server noticing both readers' deaths")
        assert freed == [] and server.num_leases == 1 and server.leased_bytes == 3 * sum(t[0].nbytes for t in src)
        res = client.load("p1", TOKENS, [6, 7, 0])  # the failover decode
        assert res.ok, res.error
        for s, theirs, mine in zip(src, read, dst):
            theirs = torch.from_numpy(theirs)
            assert torch.equal(theirs, s[[5, 1, 2]]) and torch.equal(mine[[6, 7, 0]], theirs)
        assert freed == [] and server.num_leases == 1  # read twice, still kept until acknowledged
        assert client.ack(["p1"]) == ["p1"] and freed == ["p1"] and server.num_leases == 0
        assert client.ack(["p1"]) == [] and freed == ["p1"]
    finally:
        client.close()
        server.close()


def test_retained_lease_renewed_while_answered_expires_without_and_never_frees_under_a_read():
    """retain: Renew keeps read blocks past lease_s; without it they go after lease_s; an Ack while
    another reader holds a claim waits for that reader's Done."""
    from kv_transfer.rma_kv import Claim, tokens_digest

    freed: list[str] = []
    server = RmaKVServer(rma_kv_peers.caches(1), PagedLayout.vllm_cpu(), lease_s=0.6, on_free=freed.append,
                         retain=True, reap_interval_s=0.02)
    dst = rma_kv_peers.caches(3)
    regs = [register(t) for t in dst]
    a, b = (RmaKVClient(server.address, dst, regs, PagedLayout.vllm_cpu(), timeout_s=10) for _ in range(2))
    try:
        server.offer("p1", TOKENS, [5, 1, 2])
        assert a.load("p1", TOKENS, [0, 3, 4]).ok
        for _ in range(8):  # 1.6 s of answering against a 0.6 s lease
            assert a.renew(["p1"]) == ["p1"]
            time.sleep(0.2)
        assert freed == []
        assert 0.4 < _wait(lambda: freed, 3, "the lease's end") < 1.2  # the answering decode died: no renewal
        assert a.load("p1", TOKENS, [0, 3, 4]).error.startswith("not_found")
        server.offer("p2", TOKENS, [5, 1, 2])
        assert a.load("p2", TOKENS, [0, 3, 4]).ok
        b._connect()  # a failover reader has claimed (its GETs in flight) when the first decode acknowledges
        assert isinstance(b._rpc(Claim(1, "p2", tokens_digest(TOKENS), len(TOKENS))), Claimed)
        assert a.ack(["p2"]) == ["p2"] and freed == ["p1"] and server.num_leases == 1
        b.close()  # that reader's pipe ends: now nobody reads, the acknowledged blocks go
        _wait(lambda: freed == ["p1", "p2"], 5, "the free after the last read")
        assert server.num_leases == 0
    finally:
        a.close()
        b.close()
        server.close()


def test_a_claim_whose_blocks_failed_on_the_gpu_is_a_load_error_and_nothing_is_read():
    """On CUDA caches a claim is answered once the event the offer recorded has run. If the GPU work
    failed, the reader's load fails naming it, reads nothing, and holds no claim. (The event is
    stood in for here: a GPU failure cannot be provoked without a GPU; tests/test_cuda_order.py runs
    the real event.)"""

    class FailedGpuWork:
        def synchronize(self) -> None:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    server = RmaKVServer(rma_kv_peers.caches(1), PagedLayout.vllm_cpu(), lease_s=60)
    dst = rma_kv_peers.caches(3)
    c = RmaKVClient(server.address, dst, [register(t) for t in dst], PagedLayout.vllm_cpu(), timeout_s=10)
    try:
        server.offer("p1", TOKENS, [5, 1, 2])
        server._leases["p1"].written = FailedGpuWork()
        res = c.load("p1", TOKENS, [0, 3, 4])
        assert not res.ok and res.error.startswith("producer_gpu:") and "illegal memory access" in res.error
        assert all(torch.equal(a, b) for a, b in zip(dst, rma_kv_peers.caches(3)))  # nothing landed
        assert server._leases["p1"].holders == set()
    finally:
        c.close()
        server.close()


def test_retained_rma_kv_through_the_workers_failover_load_ack_and_leased_gauges(caplog):
    """retain_kv in kv_mode rma, UcxWorkers: a second decode load reads the same blocks; leased_bytes shows
    what is held; decode's acknowledgement (ack_loads) frees them (finished_sending); a renewal finding
    the lease gone warns once per request, not at every renewal of a long answer."""
    from kv_transfer.vllm.metadata import RenewSpec

    for prod, cons, src, dst, addr in worker_pair(lease_s=30, kv_mode="rma", retain_kv=True):
        prod.wait_for_save(UcxConnectorMetadata(to_save=[SaveSpec("p1", TOKENS, [5, 1, 2])]))
        for rid, blocks in (("d1", [0, 3, 4]), ("d2", [6, 7, 1])):  # the first decode, then its failover
            meta = _rma_load(rid, addr, blocks)
            meta.to_load[0].retain = True
            cons.start_load_kv(meta)
            assert _finish(cons, rid) == (set(), set())
            for name in src:
                assert torch.equal(dst[name][blocks], src[name][[5, 1, 2]])
        assert prod.get_finished()[0] is None
        gauges = prod.get_kv_connector_stats().data
        assert gauges["leased_entries"] == {"tp0": 1} and gauges["leased_bytes"] == {"tp0": 3 * prod._block_bytes}
        cons.start_load_kv(UcxConnectorMetadata(ack_loads=[RenewSpec("p1", addr, kv_mode="rma")]))
        assert _sent(prod, "p1", 5.0) < 2.0
        assert prod.get_kv_connector_stats().data["leased_bytes"] == {"tp0": 0}
        for _ in range(3):
            cons._rma.renew("p1", [addr])
        assert sum("no longer holds p1" in r.getMessage() for r in caplog.records) == 1
