"""GPU paths through the Pipe: CUDA-to-CUDA, CUDA-to-host, host-to-CUDA (torch CUDA and cupy).

Skipped cleanly where there is no CUDA device (or no cupy for the cupy case).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests import peers as P

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


@pytest.mark.parametrize("src,dst,use_cupy", [
    ("cuda:0", "cuda:0", False), ("cuda:0", "cpu", False), ("cpu", "cuda:0", False),
    ("cuda:0", "cuda:0", True), ("cuda:0", "cpu", True),  # the last tensor sent as a cupy array
], ids=["cuda-cuda", "cuda-cpu", "cpu-cuda", "cuda-cuda-cupy", "cuda-cpu-cupy"])
def test_cuda_tensors_arrive_bit_exact(peers, src, dst, use_cupy):
    if use_cupy and importlib.util.find_spec("cupy") is None:
        pytest.skip("cupy is not installed")
    recv = peers.start(P.cuda_peer, "recv", None, src, dst)
    addr = peers.expect(recv, "addr", 120)
    send = peers.start(P.cuda_peer, "send", addr, src, dst, use_cupy)
    assert peers.expect(send, "ok", 120) == "sent"
    out = peers.expect(recv, "ok", 120)
    assert all(why is None for _, why in out), out
    assert all(dev.startswith(dst.split(":")[0]) for dev, _ in out), out
