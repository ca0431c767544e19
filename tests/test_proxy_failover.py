"""Decode failover in :mod:`kv_transfer.proxy` against fake upstreams (no vLLM; the real-vLLM test is
``tests/test_vllm_failover.py``).

Fake decodes (small aiohttp apps on loopback) fail in the ways a decode instance does after prefill
finished: killed mid-stream (the connection is cut after a few events), a 500 answer, an error event
in the stream (vLLM's answer when its engine dies). The proxy runs as a subprocess. Each case checks
what the client got (the whole answer exactly once, or an error event naming the cause, never two
answers spliced), that prefill was asked once and that every decode got the same kv_transfer_params.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Iterator

import pytest
from aiohttp import web

from tests.test_proxy import FakeCluster, FakeUpstream, ProxyProc, call, stream

N = 6  # events of a whole answer
KV = {"do_remote_prefill": True, "remote_request_id": "p-1", "remote_host": "127.0.0.1", "remote_port": 1}


class FailingDecode(FakeUpstream):
    """A fake upstream whose ``role`` is how it behaves: ``prefill``, or a decode that is ``good``,
    ``dies`` (connection cut after 3 events), answers ``500``, sends an ``error_event`` after 3
    events, or streams an ``other`` answer."""

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if self.role == "prefill":
            return web.json_response({"choices": [{"text": "x"}], "kv_transfer_params": KV})
        if self.role == "500":
            return web.json_response({"error": {"message": "engine dead"}}, status=500)
        if not body.get("stream"):
            return web.json_response({"served_by": self.name, "choices": [{"text": "whole answer"}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        word = "other" if self.role == "other" else "tok"
        for i in range(N):
            if i == 3 and self.role == "dies":
                request.transport.close()  # killed: the chunked answer never ends
                return resp
            if i == 3 and self.role == "error_event":
                await resp.write(b'data: {"error": {"message": "EngineDeadError", "code": 500}}\n\n')
                break
            event = {"id": f"cmpl-{self.name}", "created": i, "choices": [{"index": 0, "text": f"{word}{i}"}]}
            data = f"data: {json.dumps(event)}\n\n".encode()
            await resp.write(data[:7])  # an event split across writes: the proxy must cut whole events
            await resp.write(data[7:])
            await asyncio.sleep(0.02)
        else:
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


CASES = {  # proxy name -> (decode behaviours in the order round robin tries them, extra proxy args)
    "killed": (["dies", "good"], []),
    "status500": (["500", "good"], []),
    "error_event": (["error_event", "good"], []),
    "diverged": (["dies", "other"], []),
    "no_failover": (["dies", "good"], ["--decode-attempts", "1"]),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, FakeUpstream], dict[str, ProxyProc]]]:
    cluster = FakeCluster()
    fakes: dict[str, FakeUpstream] = {}
    tmp = tmp_path_factory.mktemp("failover")
    procs: dict[str, ProxyProc] = {}
    try:
        for name, (behaviours, extra) in CASES.items():
            for suffix, role in [("p", "prefill")] + [(f"d{i}", b) for i, b in enumerate(behaviours)]:
                fakes[f"{name}-{suffix}"] = cluster.start(f"{name}-{suffix}", role, FailingDecode)
            decodes = ",".join(fakes[f"{name}-d{i}"].url for i in range(len(behaviours)))
            procs[name] = ProxyProc(["--prefill", fakes[f"{name}-p"].url, "--decode", decodes, "--timeout", "5",
                                     *extra], tmp / f"{name}.log")
        for p in procs.values():
            p.wait_ready()
        yield fakes, procs
    finally:
        for p in procs.values():
            p.close()
        cluster.close()


def events_of(chunks: list) -> list[Any]:
    data = b"".join(c for _, c in chunks).decode()
    return [json.loads(e[6:]) if e[6:] != "[DONE]" else "[DONE]" for e in data.split("\n\n") if e]


def decode_bodies(fakes: dict[str, FakeUpstream], name: str) -> list[dict[str, Any]]:
    return [b for d in range(2) for b in fakes[f"{name}-d{d}"].requests]


@pytest.mark.parametrize("name", ["killed", "error_event"])
def test_stream_cut_mid_answer_resumes_on_another_decode_without_prefill(setup, name: str) -> None:
    fakes, procs = setup
    status, _, chunks = stream(procs[name].url + "/v1/completions", {"prompt": "p", "max_tokens": N, "stream": True})
    assert status == 200
    events = events_of(chunks)
    assert [e["choices"][0]["text"] for e in events[:-1]] == [f"tok{i}" for i in range(N)] and events[-1] == "[DONE]"
    assert len(fakes[f"{name}-p"].requests) == 1  # prefill ran once
    bodies = decode_bodies(fakes, name)
    assert len(bodies) == 2 and all(b["kv_transfer_params"] == KV for b in bodies)
    _, m = call("GET", procs[name].url + "/metrics?format=json")
    assert m["decode_failovers"] == 1 and m["failover_diverged"] == 0
    assert [d["up"] for d in m["decode"]] == [False, True]  # the failed decode is skipped for a while
    assert "retrying on another decode instance" in procs[name].logs()


def test_decode_answering_500_is_retried_on_another_decode(setup) -> None:
    fakes, procs = setup
    status, out = call("POST", procs["status500"].url + "/v1/completions", {"prompt": "p", "max_tokens": 2})
    assert status == 200 and out["served_by"] == "status500-d1", out
    assert len(fakes["status500-p"].requests) == 1
    assert [b["kv_transfer_params"] for b in decode_bodies(fakes, "status500")] == [KV, KV]
    assert call("GET", procs["status500"].url + "/metrics")[1].count(
        "ucxkv_proxy_decode_failovers_total 1") == 1


def test_a_retry_that_answers_differently_ends_the_stream_with_an_error_not_a_splice(setup) -> None:
    fakes, procs = setup
    status, _, chunks = stream(procs["diverged"].url + "/v1/completions",
                               {"prompt": "p", "max_tokens": N, "stream": True})
    events = events_of(chunks)
    assert status == 200 and [e["choices"][0]["text"] for e in events[:3]] == ["tok0", "tok1", "tok2"]
    assert len(events) == 4 and "does not repeat the text already sent" in events[3]["error"]["message"], events
    _, m = call("GET", procs["diverged"].url + "/metrics?format=json")
    assert m["failover_diverged"] == 1


def test_without_failover_a_cut_stream_ends_with_an_error_event(setup) -> None:
    fakes, procs = setup
    status, _, chunks = stream(procs["no_failover"].url + "/v1/completions",
                               {"prompt": "p", "max_tokens": N, "stream": True})
    events = events_of(chunks)
    assert status == 200 and len(events) == 4 and "broke off the stream" in events[3]["error"]["message"], events
    assert len(decode_bodies(fakes, "no_failover")) == 1


def test_a_retry_that_cuts_the_same_text_into_other_events_resumes_by_text() -> None:
    """vLLM may put one token or several in an event: a retry is lined up on the text, not event by event."""
    from kv_transfer.proxy import _TextResync

    def ev(text: str, finish: str | None = None) -> bytes:
        return f"data: {json.dumps({'id': 'x', 'choices': [{'index': 0, 'text': text, 'finish_reason': finish}]})}\n\n".encode()

    sync = _TextResync([ev("Hel"), ev("lo")])  # sent: "Hello"
    assert sync.feed(ev("H"), "d") is None and sync.feed(ev("ell"), "d") is None
    out = sync.feed(ev("o wor"), "d")  # covers what was sent and goes past it: only the new text is forwarded
    assert sync.done and json.loads(out[5:])["choices"][0]["text"] == " wor"
    chat = _TextResync([f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': 'ab'}}]})}\n\n".encode()])
    with pytest.raises(Exception, match="does not repeat the text"):
        chat.feed(f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': 'ax'}}]})}\n\n".encode(), "d")
