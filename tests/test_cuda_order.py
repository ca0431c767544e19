"""A transfer of CUDA memory is ordered after the kernels its caller queued before it.

UCX reads and writes device memory from streams of its own. Each case queues about 0.2 s of
GPU sleep and then the kernel that matters right before the transfer (tests/cuda_order_peers.py):
without the ordering the transfer moves the memory as it was before that kernel, and the values
checked here are wrong. Each case runs with CUDA payloads on the ordinary path and on the compiled
one (``UCXKV_FAST_PATH_CUDA``). Skipped cleanly without a CUDA device.
"""

from __future__ import annotations

import pytest
import torch

from tests import cuda_order_peers as C
from tests.conftest import SPAWN

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


@pytest.fixture(autouse=True, params=["0", "1"], ids=["ordinary", "compiled"])
def cuda_fast_path(request, monkeypatch):
    """Each case with CUDA payloads on the ordinary path and on the compiled one (UCXKV_FAST_PATH_CUDA)."""
    monkeypatch.setenv("UCXKV_FAST_PATH_CUDA", request.param)  # the peers are spawned with it


@pytest.mark.parametrize("dst", ["cuda", "cpu"])
def test_a_send_reads_what_the_kernels_queued_before_it_wrote(peers, dst):
    recv = peers.start(C.receiver, dst)
    send = peers.start(C.sender, peers.expect(recv, "addr"))
    assert peers.expect(send, "ok") == "sent"
    # a contiguous tensor whose fill was queued, then a strided one (its contiguous copy is queued too)
    assert peers.expect(recv, "ok") == [(7.0, 7.0), (7.0, 7.0)]


def test_a_receive_into_out_waits_for_the_kernels_still_reading_out(peers):
    recv = peers.start(C.out_receiver)
    send = peers.start(C.plain_sender, peers.expect(recv, "addr"))
    assert peers.expect(send, "ok") == "sent"
    doubled, out = peers.expect(recv, "ok")
    assert doubled == (2.0, 2.0), "a kernel queued before the receive read the received bytes"
    assert out == (5.0, 5.0)


def test_an_rma_reader_is_answered_once_the_offered_blocks_are_written(peers):
    offered = SPAWN.Event()
    prod = peers.start(C.rma_producer, offered)
    reader = peers.start(C.rma_reader, peers.expect(prod, "addr"), offered)
    error, lo, hi = peers.expect(reader, "ok")
    assert error is None
    assert (lo, hi) == (3.0, 3.0), "the reader got the blocks before the kernels that wrote them ran"
    prod.kill()


def test_a_lookup_entry_is_sent_as_written_by_the_stream_that_inserted_it(peers):
    inserted = SPAWN.Event()
    prod = peers.start(C.lookup_producer, inserted)
    cons = peers.start(C.lookup_consumer, peers.expect(prod, "addr"), inserted)
    assert peers.expect(cons, "ok") == (7.0, 7.0)
    prod.kill()


def test_a_local_fetch_reads_an_entry_after_the_stream_that_inserted_it(peers):
    # (the insert records where its writers end instead of waiting for them: the fetch's stream waits there)
    assert peers.expect(peers.start(C.local_lookup), "ok") == (7.0, 7.0)
