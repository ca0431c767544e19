"""Tests for :mod:`kv_transfer.proxy` against fake upstream servers (no vLLM).

The fakes are small aiohttp apps run on free loopback ports in one background
thread; they record every request they get. A "prefill" fake answers with a
``kv_transfer_params`` dict naming itself; a "decode" fake answers with its name,
or streams a few SSE chunks. The proxy runs as a subprocess
(``python -m kv_transfer.proxy --port 0``), as a user would run it.

Prompts steer the fakes: ``"no-kv"`` makes prefill return
``kv_transfer_params: null``, ``"bad"`` makes prefill answer 400, ``"hang"``
makes prefill sleep past the proxy's timeout, ``"slow"`` makes decode take a
while (for the least_loaded policy).
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Iterator

import aiohttp
import pytest
from aiohttp import web

from kv_transfer.proxy import Proxy, parse_args

REPO = pathlib.Path(__file__).resolve().parent.parent
STREAM_CHUNKS = 5
STREAM_GAP = 0.25


# ---------------------------------------------------------------------------
# fake upstream servers
# ---------------------------------------------------------------------------


def _headers(request: web.Request) -> dict[str, str]:
    return {k.lower(): v for k, v in request.headers.items()}


class FakeUpstream:
    """A fake vLLM OpenAI server (prefill or decode role) that records requests."""

    def __init__(self, name: str, role: str) -> None:
        self.name = name
        self.role = role
        self.requests: list[dict[str, Any]] = []
        self.url = ""

    def kv_params(self, n: int) -> dict[str, Any]:
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": f"engine-{self.name}",
            "remote_block_ids": [3, 1, 4, 1, 5],
            "remote_host": "127.0.0.1",
            "remote_port": 14579 + n,
            "remote_request_id": f"cmpl-{self.name}-{n}",
            "nested": {"list": [1, None, 2.5], "flag": False},
        }

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 << 20)  # big-body tests send tens of MiB
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(self, request: web.Request) -> web.Response:
        self.requests.append({"path": request.path, "method": "GET", "headers": _headers(request)})
        return web.json_response({"object": "list", "data": [{"id": "tiny", "served_by": self.name}]})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append({"path": request.path, "body": body, "headers": _headers(request)})
        n = len(self.requests)
        prompt = json.dumps(body.get("prompt", body.get("messages")))
        chat = request.path.endswith("/chat/completions")
        if self.role == "prefill":
            if "bad" in prompt:
                return web.json_response(
                    {"error": {"message": "max_tokens too large", "type": "BadRequestError", "code": 400}},
                    status=400,
                )
            if "hang" in prompt:
                await asyncio.sleep(4)
            params = None if "no-kv" in prompt else self.kv_params(n)
            return web.json_response({"id": f"p{n}", "choices": [{"text": "x"}], "kv_transfer_params": params})
        if "slow" in prompt:
            await asyncio.sleep(1.5)
        if not body.get("stream"):
            choice = {"message": {"role": "assistant", "content": self.name}} if chat else {"text": self.name}
            return web.json_response({"id": f"d{n}", "served_by": self.name, "choices": [choice]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(STREAM_CHUNKS):
            chunk = {"id": f"d{n}", "served_by": self.name, "choices": [{"index": 0, "text": f"tok{i}"}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(STREAM_GAP)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


class FakeCluster:
    """Runs fake upstreams on free ports in one background event-loop thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []

    def start(self, name: str, role: str, kind: type[FakeUpstream] = FakeUpstream) -> FakeUpstream:
        fake = kind(name, role)

        async def _start() -> int:
            runner = web.AppRunner(fake.app(), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.runners.append(runner)
            return runner.addresses[0][1]

        port = asyncio.run_coroutine_threadsafe(_start(), self.loop).result(10)
        fake.url = f"http://127.0.0.1:{port}"
        return fake

    def close(self) -> None:
        async def _stop() -> None:
            for r in self.runners:
                await r.cleanup()

        asyncio.run_coroutine_threadsafe(_stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def dead_url() -> str:
    """A loopback URL that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ---------------------------------------------------------------------------
# the proxy subprocess and a small client
# ---------------------------------------------------------------------------


class ProxyProc:
    def __init__(self, args: list[str], log_path: pathlib.Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kv_transfer.proxy", "--host", "127.0.0.1", "--port", "0", *args],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=self._log, text=True,
        )

    def wait_ready(self) -> None:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        m = re.search(r"listening on (http://\S+)", line)
        if not m:
            self.proc.kill()
            raise AssertionError(f"proxy did not start: {line!r}\n{self.logs()}")
        self.url = m.group(1)

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def close(self) -> None:
        self.proc.terminate()
        try:
            rc = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(5)
        self._log.close()
        assert rc == 0, f"proxy exited with {rc}\n{self.logs()}"


def call(method: str, url: str, body: Any = None, timeout: float = 15) -> tuple[int, Any]:
    async def _go() -> tuple[int, Any]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.request(method, url, json=body) as r:
                text = await r.text()
                try:
                    return r.status, json.loads(text)
                except ValueError:
                    return r.status, text

    return asyncio.run(_go())


def stream(url: str, body: Any) -> tuple[int, str, list[tuple[float, bytes]]]:
    """POST and collect the response chunks with their arrival times."""

    async def _go() -> tuple[int, str, list[tuple[float, bytes]]]:
        chunks: list[tuple[float, bytes]] = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as s:
            async with s.post(url, json=body) as r:
                async for chunk in r.content.iter_any():
                    chunks.append((time.monotonic(), chunk))
                return r.status, r.headers.get("Content-Type", ""), chunks

    return asyncio.run(_go())


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[FakeCluster]:
    c = FakeCluster()
    yield c
    c.close()


@pytest.fixture(scope="module")
def fakes(cluster: FakeCluster) -> dict[str, FakeUpstream]:
    return {
        "p1": cluster.start("p1", "prefill"),
        "p2": cluster.start("p2", "prefill"),
        "d1": cluster.start("d1", "decode"),
        "d2": cluster.start("d2", "decode"),
    }


@pytest.fixture(autouse=True)
def _clear(request: pytest.FixtureRequest) -> None:
    if "fakes" in request.fixturenames:
        for f in request.getfixturevalue("fakes").values():
            f.requests.clear()


@pytest.fixture(scope="module")
def proxies(fakes: dict[str, FakeUpstream], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ProxyProc]]:
    """Several proxies over the same fakes, started together (startup imports take ~2 s)."""
    tmp = tmp_path_factory.mktemp("proxy")
    dead1, dead2, dead3 = dead_url(), dead_url(), dead_url()
    specs = {
        # 1 prefill, 2 decodes given as a comma list, round robin
        "main": ["--prefill", fakes["p1"].url, "--decode", f"{fakes['d1'].url},{fakes['d2'].url}",
                 "--timeout", "2"],
        # a dead prefill first, then a live one (repeated flag); same for decode (comma list)
        "failover": ["--prefill", dead1, "--prefill", fakes["p2"].url, "--decode", f"{dead3},{fakes['d1'].url}"],
        # only a dead prefill
        "dead": ["--prefill", dead2, "--decode", fakes["d1"].url],
        "least": ["--prefill", fakes["p1"].url, "--decode", fakes["d1"].url, fakes["d2"].url,
                  "--policy", "least_loaded"],
    }
    procs: dict[str, ProxyProc] = {}
    try:
        for name, args in specs.items():
            procs[name] = ProxyProc(args, tmp / f"{name}.log")
        for p in procs.values():
            p.wait_ready()
        procs["dead"].dead_url = dead2  # type: ignore[attr-defined]
        procs["failover"].dead_url = dead1  # type: ignore[attr-defined]
        procs["failover"].dead_decode_url = dead3  # type: ignore[attr-defined]
        yield procs
    finally:
        for p in procs.values():
            p.close()


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------


def test_parse_args_lists() -> None:
    args = parse_args(["--prefill", "http://a:1,b:2/", "--prefill", "http://c:3",
                       "--decode", "http://d:4", "http://e:5", "--policy", "least_loaded"])
    assert args.prefill == ["http://a:1", "http://b:2", "http://c:3"]
    assert args.decode == ["http://d:4", "http://e:5"]
    assert args.policy == "least_loaded" and args.timeout == 300 and args.connect_timeout == 5
    assert args.host == "127.0.0.1"


def test_prefill_body_does_not_touch_original() -> None:
    body = {"model": "m", "prompt": "hi", "max_tokens": 50, "stream": True,
            "stream_options": {"include_usage": True}, "min_tokens": 5}
    p = Proxy.prefill_body(body, chat=True)
    assert p["max_tokens"] == 1 and p["max_completion_tokens"] == 1 and p["stream"] is False
    assert "stream_options" not in p and "min_tokens" not in p
    assert p["kv_transfer_params"] == {"do_remote_decode": True, "do_remote_prefill": False}
    assert body["max_tokens"] == 50 and body["stream"] is True and "kv_transfer_params" not in body


def test_completions_flow(proxies: dict[str, ProxyProc], fakes: dict[str, FakeUpstream]) -> None:
    body = {"model": "tiny", "prompt": "hello world", "max_tokens": 7, "temperature": 0}
    status, out = call("POST", proxies["main"].url + "/v1/completions", body)
    assert status == 200, out
    assert out["served_by"] in ("d1", "d2")

    (preq,) = fakes["p1"].requests
    pb = preq["body"]
    assert preq["path"] == "/v1/completions"
    assert pb["max_tokens"] == 1 and pb["stream"] is False
    assert pb["kv_transfer_params"] == {"do_remote_decode": True, "do_remote_prefill": False}
    assert pb["prompt"] == "hello world" and pb["temperature"] == 0
    assert "max_completion_tokens" not in pb

    (dreq,) = fakes["d1"].requests + fakes["d2"].requests
    db = dreq["body"]
    assert db["kv_transfer_params"] == fakes["p1"].kv_params(1)  # verbatim from prefill
    assert db["max_tokens"] == 7 and db["prompt"] == "hello world" and db["temperature"] == 0
    # one request id for both halves
    assert preq["headers"]["x-request-id"] == dreq["headers"]["x-request-id"]


def test_chat_route(proxies: dict[str, ProxyProc], fakes: dict[str, FakeUpstream]) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9}
    status, out = call("POST", proxies["main"].url + "/v1/chat/completions", body)
    assert status == 200, out
    assert out["choices"][0]["message"]["content"] in ("d1", "d2")
    (preq,) = fakes["p1"].requests
    assert preq["path"] == "/v1/chat/completions"
    assert preq["body"]["max_tokens"] == 1 and preq["body"]["max_completion_tokens"] == 1
    assert preq["body"]["kv_transfer_params"]["do_remote_decode"] is True
    (dreq,) = fakes["d1"].requests + fakes["d2"].requests
    assert dreq["path"] == "/v1/chat/completions"
    assert dreq["body"]["max_completion_tokens"] == 9 and "max_tokens" not in dreq["body"]
    assert dreq["body"]["messages"] == body["messages"]
    assert dreq["body"]["kv_transfer_params"] == fakes["p1"].kv_params(1)


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_streaming_passthrough(proxies: dict[str, ProxyProc], fakes: dict[str, FakeUpstream], route: str) -> None:
    body = {"model": "tiny", "prompt": "stream me", "messages": [{"role": "user", "content": "s"}],
            "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    status, ctype, chunks = stream(proxies["main"].url + route, body)
    assert status == 200 and ctype.startswith("text/event-stream")
    data = b"".join(c for _, c in chunks).decode()
    events = [e[len("data: "):] for e in data.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    assert [json.loads(e)["choices"][0]["text"] for e in events[:-1]] == [f"tok{i}" for i in range(STREAM_CHUNKS)]
    # passed through as it came, not buffered: the first chunk arrived well before the last
    assert chunks[-1][0] - chunks[0][0] > STREAM_GAP * (STREAM_CHUNKS - 2)
    (preq,) = fakes["p1"].requests
    assert preq["body"]["stream"] is False and "stream_options" not in preq["body"]
    (dreq,) = fakes["d1"].requests + fakes["d2"].requests
    assert dreq["body"]["stream"] is True and dreq["body"]["stream_options"] == {"include_usage": True}
    assert dreq["body"]["kv_transfer_params"] == fakes["p1"].kv_params(1)


def test_round_robin_over_two_decodes(proxies: dict[str, ProxyProc], fakes: dict[str, FakeUpstream]) -> None:
    served = []
    for i in range(6):
        status, out = call("POST", proxies["main"].url + "/v1/completions", {"prompt": f"rr {i}", "max_tokens": 2})
        assert status == 200, out
        served.append(out["served_by"])
    assert sorted(served) == ["d1"] * 3 + ["d2"] * 3
    assert all(a != b for a, b in zip(served, served[1:])), served
    assert len(fakes["d1"].requests) == 3 and len(fakes["d2"].requests) == 3
    assert len(fakes["p1"].requests) == 6


def test_missing_kv_params_still_decodes(proxies: dict[str, ProxyProc], fakes: dict[str, FakeUpstream]) -> None:
    body = {"prompt": "no-kv please", "max_tokens": 3, "kv_transfer_params": {"client": "junk"}}
    status, out = call("POST", proxies["main"].url + "/v1/completions", body)
    assert status == 200, out
    (dreq,) = fakes["d1"].requests + fakes["d2"].requests
    assert "kv_transfer_params" not in dreq["body"]
    deadline = time.monotonic() + 5
    while "returned no kv_transfer_params" not in proxies["main"].logs():
        assert time.monotonic() < deadline, proxies["main"].logs()
        time.sleep(0.05)
    _, metrics = call("GET", proxies["main"].url + "/metrics?format=json")
    assert metrics["missing_kv_transfer_params"] >= 1


def test_prefill_client_error_passed_through(proxies: dict[str, ProxyProc], fakes: dict[str, FakeUpstream]) -> None:
    status, out = call("POST", proxies["main"].url + "/v1/completions", {"prompt": "bad", "max_tokens": 3})
    assert status == 400 and out["error"]["message"] == "max_tokens too large"
    assert not fakes["d1"].requests and not fakes["d2"].requests


def test_invalid_json_body(proxies: dict[str, ProxyProc]) -> None:
    async def _go() -> tuple[int, Any]:
        async with aiohttp.ClientSession() as s:
            async with s.post(proxies["main"].url + "/v1/completions", data=b"{nope") as r:
                return r.status, await r.json()

    status, out = asyncio.run(_go())
    assert status == 400 and out["error"]["type"] == "invalid_request_error"


def test_upstream_timeout(proxies: dict[str, ProxyProc], fakes: dict[str, FakeUpstream]) -> None:
    t0 = time.monotonic()
    status, out = call("POST", proxies["main"].url + "/v1/completions", {"prompt": "hang", "max_tokens": 3})
    assert status == 504, out
    assert out["error"]["type"] == "upstream_timeout" and fakes["p1"].url in out["error"]["message"]
    assert time.monotonic() - t0 < 3.9
    assert not fakes["d1"].requests and not fakes["d2"].requests


def test_dead_prefill_gives_clear_error(proxies: dict[str, ProxyProc], fakes: dict[str, FakeUpstream]) -> None:
    proxy = proxies["dead"]
    status, out = call("POST", proxy.url + "/v1/completions", {"prompt": "x", "max_tokens": 3})
    assert status in (502, 503), out
    assert out["error"]["type"] == "upstream_unavailable"
    msg = out["error"]["message"]
    assert msg.startswith(f"prefill instance {proxy.dead_url} unreachable: "), msg
    assert not fakes["d1"].requests
    status, health = call("GET", proxy.url + "/health")
    assert status == 503 and health["status"] == "unavailable"
    assert health["prefill"][0]["url"] == proxy.dead_url and health["prefill"][0]["up"] is False
    assert health["decode"][0]["up"] is True


def test_dead_instances_skipped_when_others_are_up(proxies: dict[str, ProxyProc], fakes: dict[str, FakeUpstream]) -> None:
    proxy = proxies["failover"]
    for i in range(3):
        status, out = call("POST", proxy.url + "/v1/completions", {"prompt": f"f{i}", "max_tokens": 3})
        assert status == 200, out
        assert out["served_by"] == "d1"
    assert len(fakes["p2"].requests) == 3
    assert fakes["d1"].requests[-1]["body"]["kv_transfer_params"] == fakes["p2"].kv_params(3)
    _, m = call("GET", proxy.url + "/metrics?format=json")
    dead = next(i for i in m["prefill"] if i["url"] == proxy.dead_url)
    assert dead["up"] is False and dead["errors"] >= 1 and dead["last_error"]
    # marked down: tried once, not on every request
    assert dead["requests"] == 1
    assert f"prefill instance {proxy.dead_url} unreachable" in proxy.logs()
    assert f"decode instance {proxy.dead_decode_url} unreachable" in proxy.logs()
    status, health = call("GET", proxy.url + "/health")
    assert status == 200 and health["status"] == "ok"
    assert [p["up"] for p in health["prefill"]] == [False, True]
    assert [d["up"] for d in health["decode"]] == [False, True]
    assert health["decode"][0]["url"] == proxy.dead_decode_url


def test_least_loaded(proxies: dict[str, ProxyProc], fakes: dict[str, FakeUpstream]) -> None:
    url = proxies["least"].url + "/v1/completions"

    async def _go() -> list[str]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as s:
            async def one(prompt: str) -> str:
                async with s.post(url, json={"prompt": prompt, "max_tokens": 2}) as r:
                    assert r.status == 200
                    return (await r.json())["served_by"]

            slow = asyncio.create_task(one("slow one"))
            await asyncio.sleep(0.5)  # the slow request now sits on one decode
            fast = [await one(f"fast {i}") for i in range(3)]
            return [await slow, *fast]

    slow_by, *fast_by = asyncio.run(_go())
    assert all(f != slow_by for f in fast_by), (slow_by, fast_by)


def test_health_and_models(proxies: dict[str, ProxyProc], fakes: dict[str, FakeUpstream]) -> None:
    status, health = call("GET", proxies["main"].url + "/health")
    assert status == 200 and health["status"] == "ok"
    assert [p["url"] for p in health["prefill"]] == [fakes["p1"].url]
    assert [d["url"] for d in health["decode"]] == [fakes["d1"].url, fakes["d2"].url]
    assert all(i["up"] for i in health["prefill"] + health["decode"])

    status, models = call("GET", proxies["main"].url + "/v1/models")
    assert status == 200 and models["data"][0]["id"] == "tiny"
    assert models["data"][0]["served_by"] in ("d1", "d2")
    assert not fakes["p1"].requests

    status, text = call("GET", proxies["main"].url + "/metrics")
    assert status == 200
    assert f'ucxkv_proxy_upstream_requests_total{{role="prefill",instance="{fakes["p1"].url}"}}' in text
    assert 'ucxkv_proxy_requests_total{route="/v1/completions"}' in text


def test_without_aiohttp_the_proxy_says_which_extra_to_install():
    import subprocess
    import sys

    code = "import sys; sys.modules['aiohttp'] = None; import kv_transfer.proxy"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "pip install 'ucxkv[proxy]'" in r.stderr, r.stderr[-2000:]
    # the library itself imports without aiohttp
    code = "import sys; sys.modules['aiohttp'] = None; import kv_transfer, transport"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
