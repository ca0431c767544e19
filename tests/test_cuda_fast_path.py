"""CUDA payload tensors through the compiled path (``UCXKV_FAST_PATH_CUDA=1``).

With the setting on, a CUDA payload tensor is sent and received (into ``out``) by the same C
calls as a CPU one; UCX finds the memory type itself. Where the two ends disagree about the
device (a CPU sender, a CUDA ``out``), the header is not the one expected and the ordinary
path takes over: the bytes must be right either way. The ordering of transfers after the
caller's kernels is tests/test_cuda_order.py's (run with the setting on and off). Skipped
cleanly without a CUDA device.
"""

from __future__ import annotations

import pytest
import torch

from tests import cuda_fast_peers as C

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


@pytest.fixture(autouse=True)
def cuda_fast_path(monkeypatch):
    monkeypatch.setenv("UCXKV_FAST_PATH_CUDA", "1")  # the peers are spawned with it


def test_cuda_to_cuda_payloads_never_take_the_ordinary_path(peers):
    recv = peers.start(C.receiver, "cuda")
    send = peers.start(C.sender, peers.expect(recv, "addr"), "cuda")
    sent = peers.expect(send, "ok")
    wrong, received = peers.expect(recv, "ok")
    assert wrong == []
    assert sent == {"_post_send": 0, "_post_recv": 0}, sent
    assert received == {"_post_send": 0, "_post_recv": 0}, received


@pytest.mark.parametrize("src,dst", [("cpu", "cuda"), ("cuda", "cpu")])
def test_ends_that_disagree_about_the_device_still_get_every_byte(peers, src, dst):
    recv = peers.start(C.receiver, dst)
    send = peers.start(C.sender, peers.expect(recv, "addr"), src)
    peers.expect(send, "ok")
    wrong, received = peers.expect(recv, "ok")
    assert wrong == []
    # each header named the sender's device, not the out's: the ordinary path took every tensor
    assert received["_post_recv"] == len(C.CASES) + C.WINDOW, received


def test_a_cuda_out_of_another_shape_is_refused_with_both_shapes(peers):
    recv = peers.start(C.shape_receiver)
    send = peers.start(C.shape_sender, peers.expect(recv, "addr"))
    kind, msg = peers.expect(recv, "ok")
    assert kind == "RemoteProtocolError", (kind, msg)
    assert "float32[262144]" in msg and "float32[131072, 2]" in msg, msg
    send.kill()
