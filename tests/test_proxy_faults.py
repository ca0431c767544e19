"""Faults around :mod:`kv_transfer.proxy`: the proxy killed mid-stream, and a silent prefill.

Fake upstreams (small aiohttp apps on loopback, one background event-loop thread)
stand in for vLLM; the proxy runs as a subprocess (``python -m kv_transfer.proxy``),
as in ``tests/test_proxy.py``. The helpers here (:class:`Upstreams`,
:class:`ProxyProc`, :func:`post`) are also used by ``tests/test_fuzz_more.py``.

- The proxy SIGKILLed while it passes a decode stream through: the client gets a
  connection error within seconds (not a hang, not a silently short answer), the
  upstreams keep serving, and a proxy restarted on the same port serves again.
- A prefill that accepts the TCP connection and never answers: the proxy answers
  504 ``upstream_timeout`` within its ``--timeout`` and keeps serving.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Iterator

import aiohttp
import pytest
from aiohttp import web

REPO = pathlib.Path(__file__).resolve().parent.parent

KV_PARAMS = {"do_remote_prefill": True, "do_remote_decode": False, "remote_request_id": "r",
             "remote_host": "127.0.0.1", "remote_port": 1}


# ---------------------------------------------------------------------------
# fake upstreams
# ---------------------------------------------------------------------------


class Upstreams:
    """Fake prefill/decode servers on free loopback ports, served by one background loop.

    ``prefill()``: answers any JSON body with ``kv_transfer_params``.
    ``decode(chunks, gap)``: answers with its name, or streams ``max_tokens`` (an
    int up to 1000, else ``chunks``) SSE events ``gap`` seconds apart when the
    body's ``stream`` is truthy; it counts
    streams completed and streams cut by the other side.
    ``silent()``: a raw TCP listener that accepts connections and never answers.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []
        self.silent_socks: list[socket.socket] = []
        self.held: list[socket.socket] = []
        self.stats: dict[str, int] = {"streams_done": 0, "streams_cut": 0, "decode_requests": 0,
                                      "prefill_requests": 0}
        self._stop = threading.Event()

    def _serve(self, app: web.Application) -> str:
        async def _start() -> int:
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.runners.append(runner)
            return runner.addresses[0][1]

        port = asyncio.run_coroutine_threadsafe(_start(), self.loop).result(10)
        return f"http://127.0.0.1:{port}"

    @staticmethod
    async def _health(request: web.Request) -> web.Response:
        return web.Response(text="")

    def prefill(self) -> str:
        async def generate(request: web.Request) -> web.Response:
            await request.read()
            self.stats["prefill_requests"] += 1
            return web.json_response({"id": "p", "choices": [{"text": "x"}], "kv_transfer_params": KV_PARAMS})

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", generate)
        app.router.add_post("/v1/chat/completions", generate)
        app.router.add_get("/health", self._health)
        return self._serve(app)

    def decode(self, chunks: int = 3, gap: float = 0.0) -> str:
        async def generate(request: web.Request) -> web.StreamResponse:
            body = json.loads(await request.read())
            self.stats["decode_requests"] += 1
            if not (isinstance(body, dict) and body.get("stream")):
                return web.json_response({"id": "d", "served_by": "decode", "choices": [{"text": "ok"}]})
            n = body.get("max_tokens")
            n = n if type(n) is int and 0 < n <= 1000 else chunks
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            try:
                for i in range(n):
                    await resp.write(f"data: {json.dumps({'choices': [{'text': f'tok{i}'}]})}\n\n".encode())
                    if gap:
                        await asyncio.sleep(gap)
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
            except (ConnectionResetError, asyncio.CancelledError):
                self.stats["streams_cut"] += 1
                raise
            self.stats["streams_done"] += 1
            return resp

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", generate)
        app.router.add_post("/v1/chat/completions", generate)
        app.router.add_get("/health", self._health)
        return self._serve(app)

    def silent(self) -> str:
        """Accepts every connection, reads nothing, answers nothing."""
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)
        srv.settimeout(0.2)
        self.silent_socks.append(srv)

        def accept_loop() -> None:
            while not self._stop.is_set():
                try:
                    conn, _ = srv.accept()
                except (TimeoutError, socket.timeout):
                    continue
                except OSError:
                    return
                self.held.append(conn)

        threading.Thread(target=accept_loop, daemon=True).start()
        return f"http://127.0.0.1:{srv.getsockname()[1]}"

    def close(self) -> None:
        self._stop.set()
        for s in self.held + self.silent_socks:
            s.close()

        async def _stop() -> None:
            for r in self.runners:
                await r.cleanup()

        asyncio.run_coroutine_threadsafe(_stop(), self.loop).result(15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# ---------------------------------------------------------------------------
# the proxy subprocess and a client
# ---------------------------------------------------------------------------


class ProxyProc:
    """``python -m kv_transfer.proxy`` on loopback; ``port=0`` picks a free port."""

    def __init__(self, args: list[str], log_path: pathlib.Path, port: int = 0) -> None:
        self.log_path = log_path
        self._log = open(log_path, "a")
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kv_transfer.proxy", "--host", "127.0.0.1", "--port", str(port), *args],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=self._log, text=True,
        )
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if not m:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"proxy did not start: {line!r}\n{self.logs()}")
        self.port = int(m.group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def post(port: int, path: str, body: bytes, headers: dict[str, str] | None = None,
         timeout: float = 10.0, method: str = "POST") -> tuple[int, str, bytes]:
    """One request over a fresh connection; returns status, content type and the raw body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        hdrs = {"Content-Type": "application/json"} if headers is None else headers
        conn.request(method, path, body=body if method == "POST" else None, headers=hdrs)
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type", ""), r.read()
    finally:
        conn.close()


def get_json(port: int, path: str, timeout: float = 10.0) -> tuple[int, Any]:
    status, _, raw = post(port, path, b"", headers={}, timeout=timeout, method="GET")
    return status, json.loads(raw)


def wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------


@pytest.fixture
def ups() -> Iterator[Upstreams]:
    u = Upstreams()
    yield u
    u.close()


def test_proxy_killed_mid_stream(ups: Upstreams, tmp_path: pathlib.Path) -> None:
    prefill, decode = ups.prefill(), ups.decode(chunks=40, gap=0.1)  # a 4 s stream
    args = ["--prefill", prefill, "--decode", decode, "--timeout", "5"]
    proxy = ProxyProc(args, tmp_path / "proxy.log")
    restarted = None
    try:
        body = {"prompt": "stream", "max_tokens": 40, "stream": True}

        async def _stream_until_killed() -> tuple[list[bytes], BaseException | None, float]:
            got: list[bytes] = []
            t_kill = 0.0
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
                async with s.post(proxy.url + "/v1/completions", json=body) as r:
                    assert r.status == 200
                    try:
                        async for chunk in r.content.iter_any():
                            got.append(chunk)
                            if len(got) == 2 and not t_kill:
                                t_kill = time.monotonic()
                                proxy.kill()
                    except (aiohttp.ClientError, ConnectionError) as exc:
                        return got, exc, time.monotonic() - t_kill
            return got, None, time.monotonic() - t_kill

        got, exc, after_kill = asyncio.run(_stream_until_killed())
        data = b"".join(got)
        assert b"tok0" in data and b"[DONE]" not in data, data
        # a clear connection error, quickly: never a hang, never a silently short answer
        assert exc is not None, f"stream ended without an error after the kill: {data!r}"
        assert isinstance(exc, (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                                aiohttp.ClientConnectionError, ConnectionError)), repr(exc)
        assert after_kill < 3.0, after_kill
        print(f"\nclient error {after_kill:.3f}s after SIGKILL: {type(exc).__name__}: {exc}")

        # the decode upstream saw its client go and lives on; so does prefill
        wait_for(lambda: ups.stats["streams_cut"] == 1, 10, "decode to notice the cut stream")
        p_port, d_port = int(prefill.rsplit(":", 1)[1]), int(decode.rsplit(":", 1)[1])
        assert post(d_port, "/health", b"", method="GET")[0] == 200
        assert post(p_port, "/health", b"", method="GET")[0] == 200
        status, _, raw = post(d_port, "/v1/completions", json.dumps({"prompt": "direct"}).encode())
        assert status == 200 and json.loads(raw)["served_by"] == "decode"

        # a proxy restarted on the same port serves again, streams included
        t0 = time.monotonic()
        restarted = ProxyProc(args, tmp_path / "proxy.log", port=proxy.port)
        assert restarted.port == proxy.port
        short = {**body, "max_tokens": 3}
        status, ctype, raw = post(proxy.port, "/v1/completions", json.dumps(short).encode(), timeout=20)
        assert status == 200 and ctype.startswith("text/event-stream"), raw
        events = [e for e in raw.decode().split("\n\n") if e]
        assert len(events) == 4 and events[-1] == "data: [DONE]"
        assert get_json(proxy.port, "/health")[0] == 200
        assert ups.stats["streams_done"] == 1
        print(f"restarted proxy on port {proxy.port} served a full stream in {time.monotonic() - t0:.2f}s")
    finally:
        proxy.close()
        if restarted is not None:
            restarted.close()
            assert restarted.proc.returncode == 0, restarted.logs()


def test_silent_prefill_gives_504_within_timeout(ups: Upstreams, tmp_path: pathlib.Path) -> None:
    silent, good, decode = ups.silent(), ups.prefill(), ups.decode()
    timeout = 1.0
    # round robin: the first request goes to the silent prefill, the next to the good one
    proxy = ProxyProc(["--prefill", silent, "--prefill", good, "--decode", decode,
                       "--timeout", str(timeout), "--policy", "round_robin"], tmp_path / "proxy.log")
    try:
        body = json.dumps({"prompt": "hello", "max_tokens": 3}).encode()
        t0 = time.monotonic()
        status, ctype, raw = post(proxy.port, "/v1/completions", body, timeout=timeout + 10)
        took = time.monotonic() - t0
        out = json.loads(raw)
        assert status == 504 and ctype.startswith("application/json"), (status, raw)
        assert out["error"]["type"] == "upstream_timeout" and silent in out["error"]["message"], out
        assert timeout * 0.9 <= took < timeout + 2.5, took
        print(f"\n504 after {took:.3f}s (--timeout {timeout:g}): {out['error']['message']}")
        assert ups.held, "the silent prefill never got a connection"
        assert ups.stats["decode_requests"] == 0

        # keeps serving: the next request goes to the good prefill and completes
        status, _, raw = post(proxy.port, "/v1/completions", body)
        assert status == 200 and json.loads(raw)["served_by"] == "decode", raw
        status, metrics = get_json(proxy.port, "/metrics?format=json")
        assert status == 200
        by_url = {i["url"]: i for i in metrics["prefill"]}
        assert by_url[silent]["errors"] == 1 and by_url[silent]["in_flight"] == 0
        assert by_url[good]["errors"] == 0
        assert metrics["responses"] == {"200": 1, "504": 1}
        assert proxy.proc.poll() is None
    finally:
        proxy.close()
        assert proxy.proc.returncode == 0, proxy.logs()
