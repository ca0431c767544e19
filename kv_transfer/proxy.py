"""``ucxkv-proxy``: an OpenAI-compatible HTTP router that pairs prefill and decode instances.

Needs the ``proxy`` extra (``pip install 'ucxkv[proxy]'``, i.e. aiohttp); without
it importing this module raises an ImportError saying so. One file on purpose
(~950 lines): configuration, instance pool, the two-hop forwarding with decode failover and the CLI
of one small server that is read top to bottom; nothing else imports its parts.

The proxy sits in front of one or more vLLM *prefill* instances (started with
``kv_role: kv_producer``) and one or more *decode* instances (``kv_consumer``)
and makes the pair look like a single OpenAI server. For each
``/v1/completions`` or ``/v1/chat/completions`` request it:

1. sends a copy to a prefill instance with ``max_tokens=1`` (and
   ``max_completion_tokens=1`` on the chat route), ``stream=false`` and
   ``"kv_transfer_params": {"do_remote_decode": true, "do_remote_prefill": false}``,
   so prefill computes the prompt's KV cache and keeps it for the decode side;
2. takes the ``kv_transfer_params`` dict from prefill's JSON answer (what the
   connector's ``request_finished`` returned) and puts it, verbatim, into the
   *original* request, which goes to a decode instance;
3. returns decode's answer, or passes decode's SSE stream through chunk by chunk
   when the client asked for ``"stream": true``.

When prefill's answer carries no ``kv_transfer_params`` the request still goes to
decode (without them) and a warning is logged: decode will recompute the prompt.

Decode failover (``--decode-attempts``, default 2): when the decode instance fails
after prefill finished (it answers 5xx, breaks off or stays silent past
``--timeout``, or its stream carries an error event) the proxy sends the same
request, with the same ``kv_transfer_params``, to another decode instance;
prefill is not repeated. That decode loads the KV from prefill again when prefill
retains it (``retain_kv``: until a decode acknowledges it by completing the
request, or the lease ends) and recomputes the prompt otherwise. A stream cut
mid-answer resumes: the proxy forwards whole SSE events only, checks that the
new decode's first events repeat the ones already sent (same ``choices``:
greedy or seeded sampling) and forwards the rest; if they differ it ends the
stream with an error event instead of splicing two different answers.

Instances are chosen per request by ``--policy``: ``round_robin`` or
``least_loaded`` (fewest requests in flight through this proxy, ties rotate). An
instance that cannot be connected to is marked down for ``--down-time`` seconds
and the next one is tried; when none answers the client gets a 503 with
``{"error": {"message": "prefill instance http://... unreachable: ...",
"type": "upstream_unavailable"}}``. Every upstream call has a timeout
(``--timeout``, whole request; for streams the longest silence between chunks)
and a connect timeout (``--connect-timeout``); a timeout gives a 504
(``upstream_timeout``). Errors that upstream itself returns (a 400 for a bad
request, say) are passed through unchanged.

Other routes: ``/health`` probes every instance and answers 200 with a
per-instance status JSON when at least one prefill and one decode instance are
up (503 otherwise); ``/v1/models`` is forwarded to a decode instance;
``/metrics`` gives counters (requests, errors and in-flight requests per
instance) as Prometheus text, or JSON with ``?format=json``.

Command line (console script ``ucxkv-proxy``)::

    python -m kv_transfer.proxy --prefill http://10.0.0.1:8100 \\
        --decode http://10.0.0.2:8200,http://10.0.0.3:8200 --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import logging
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

try:
    import aiohttp
    from aiohttp import web
except ImportError as exc:  # the library itself does not need aiohttp: only this proxy does
    raise ImportError("the ucxkv proxy needs aiohttp: pip install 'ucxkv[proxy]' (or pip install aiohttp)") from exc

__all__ = [
    "Instance",
    "InstancePool",
    "ProxyConfig",
    "build_app",
    "parse_args",
    "main",
    "POLICIES",
]

log = logging.getLogger("kv_transfer.proxy")

POLICIES = ("round_robin", "least_loaded")

#: what prefill is told to do with the KV cache it computes
PREFILL_KV_PARAMS: dict[str, Any] = {"do_remote_decode": True, "do_remote_prefill": False}

#: request headers copied to upstream (everything else is set by the proxy)
_FORWARDED_HEADERS = ("Authorization", "OpenAI-Organization", "OpenAI-Project")

#: request bodies up to this size are accepted (prompts may be token-id lists)
_MAX_BODY = 64 * 1024 * 1024

#: deepest JSON nesting accepted in a request body (deeper ones are a 400)
_MAX_DEPTH = 128

#: bodies above this size are parsed and re-encoded in a worker process (json holds the GIL,
#: so a thread would still stall the event loop); at most _PARSE_WORKERS at once
_OFFLOAD_BYTES = 256 * 1024
_PARSE_WORKERS = 2


class _BadBody(Exception):
    """A client's request body cannot be used; the message says why (a 400)."""


def _parse_body(raw: bytes) -> dict[str, Any]:
    """The request object in ``raw``; raises :class:`_BadBody` for anything else."""
    try:
        body = json.loads(raw)
    except (ValueError, LookupError, RecursionError) as exc:
        # ValueError: bad JSON, bad UTF-8, an integer past Python's digit limit;
        # LookupError: an unknown charset; RecursionError: nesting too deep to parse
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise _BadBody(f"request body is not valid JSON: {reason}") from None
    if not isinstance(body, dict):
        raise _BadBody("request body must be a JSON object")
    if _too_deep(body, _MAX_DEPTH):
        # copying and re-encoding it for the upstreams would overflow the stack
        raise _BadBody(f"request body is nested deeper than {_MAX_DEPTH} levels")
    return body


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _prepare(raw: bytes, chat: bool) -> tuple[bytes, bytes, bool]:
    """Parse a client body once: the prefill request, the decode request less its closing
    brace and ``kv_transfer_params`` (see :func:`_decode_request`), and whether it streams."""
    body = _parse_body(raw)
    rest = dict(body)
    rest.pop("kv_transfer_params", None)
    return _dumps(Proxy.prefill_body(body, chat)), _dumps(rest)[:-1], bool(body.get("stream"))


def _decode_request(prefix: bytes, kv_params: Any) -> bytes:
    """The original request (``prefix`` from :func:`_prepare`) carrying prefill's ``kv_transfer_params``."""
    if kv_params is None:
        return prefix + b"}"
    sep = b"" if prefix == b"{" else b", "
    return prefix + sep + b'"kv_transfer_params": ' + _dumps(kv_params) + b"}"


def _event_data(event: bytes) -> Any:
    """The JSON of one SSE event ``data: {...}`` (its raw bytes when it is not JSON, e.g. ``[DONE]``)."""
    data = event.strip()
    if data.startswith(b"data:"):
        data = data[5:].strip()
    try:
        return json.loads(data)
    except ValueError:
        return data


def _event_choices(event: bytes) -> Any:
    """What two decodes' events must agree on to be the same answer: the ``choices`` (not ids, times)."""
    obj = _event_data(event)
    return obj.get("choices") if isinstance(obj, dict) else obj


def _event_text(event: bytes) -> tuple[dict, dict, str] | None:
    """(event JSON, its one choice, the text it adds) for a single-choice completion or chat event, else None."""
    obj = _event_data(event)
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    if "text" in choice:
        return obj, choice, str(choice.get("text") or "")
    delta = choice.get("delta")
    return (obj, choice, str(delta.get("content") or "")) if isinstance(delta, dict) else None


class _TextResync:
    """Lines a retried decode's stream up with the text already sent, by text, not by event.

    vLLM may cut the same greedy answer into different events (one token or several per event,
    depending on timing), so a retry is checked on the text it repeats: its events are dropped
    until they cover what was sent, the one that goes past it is forwarded with only the new
    text, and anything that disagrees raises :class:`_StreamDiverged`.
    """

    def __init__(self, sent: list[bytes]):
        self.sent_text = "".join(t[2] for t in map(_event_text, sent) if t is not None)
        self.text = ""
        self.done = False

    @staticmethod
    def usable(sent: list[bytes]) -> bool:
        return bool(sent) and all(_event_text(e) is not None for e in sent)

    def feed(self, event: bytes, url: str) -> bytes | None:
        """The event to forward (possibly rewritten), or None to drop it."""
        parsed = _event_text(event)
        if parsed is None:
            raise _StreamDiverged(f"decode failover: decode instance {url} sent {event[:80]!r} before repeating "
                                  f"the {len(self.sent_text)} characters already sent; the answer is incomplete")
        obj, choice, text = parsed
        self.text += text
        n = len(self.sent_text)
        if not (self.sent_text.startswith(self.text) or self.text.startswith(self.sent_text)):
            raise _StreamDiverged(f"decode failover: decode instance {url} does not repeat the text already sent "
                                  f"(sampling is not deterministic); the answer is incomplete")
        if len(self.text) < n or (len(self.text) == n and not choice.get("finish_reason")):
            self.done = len(self.text) == n
            return None
        self.done = True
        rest = self.text[n:]
        if "text" in choice:
            choice["text"] = rest
        else:
            choice["delta"]["content"] = rest
        return f"data: {json.dumps(obj)}\n\n".encode()


def _error_event(event: bytes) -> str | None:
    """The message of an SSE error event (vLLM's answer when its engine fails mid-stream), else None."""
    if b'"error"' not in event:
        return None
    obj = _event_data(event)
    if not isinstance(obj, dict) or "choices" in obj or not obj.get("error"):
        return None
    err = obj["error"]
    return str(err.get("message", err) if isinstance(err, dict) else err)[:500]


async def _write(out: web.StreamResponse, data: bytes) -> bool:
    """Write to the client; False when it went away."""
    try:
        await out.write(data)
    except ConnectionResetError:
        return False
    return True


def _too_deep(obj: Any, limit: int) -> bool:
    """Whether ``obj`` (parsed JSON) nests lists/dicts deeper than ``limit``; iterative."""
    stack = [(obj, 1)]
    while stack:
        o, depth = stack.pop()
        children = o.values() if isinstance(o, dict) else o
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


# ---------------------------------------------------------------------------
# instances and selection
# ---------------------------------------------------------------------------


@dataclass
class Instance:
    """One upstream vLLM server and what the proxy knows about it."""

    url: str
    role: str
    in_flight: int = 0
    requests: int = 0
    errors: int = 0
    down_until: float = 0.0
    last_error: str | None = None

    def is_up(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self.down_until

    def mark_down(self, reason: str, seconds: float) -> None:
        was_up = self.is_up()
        self.down_until = time.monotonic() + seconds
        self.last_error = reason
        if was_up:
            log.warning("%s instance %s marked down for %.1fs: %s", self.role, self.url, seconds, reason)

    def mark_up(self) -> None:
        if not self.is_up():
            log.info("%s instance %s is back up", self.role, self.url)
        self.down_until = 0.0
        self.last_error = None

    def status(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "up": self.is_up(),
            "in_flight": self.in_flight,
            "requests": self.requests,
            "errors": self.errors,
            "last_error": self.last_error,
        }


class InstancePool:
    """The instances of one role and the policy that orders them for a request."""

    def __init__(self, role: str, urls: Sequence[str], policy: str) -> None:
        if not urls:
            raise ValueError(f"no {role} instances given")
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
        self.role = role
        self.policy = policy
        self.instances = [Instance(url=u, role=role) for u in urls]
        self._next = 0

    def candidates(self) -> list[Instance]:
        """Instances in the order to try them: the policy's order over the up ones,
        then the ones marked down (soonest back first) as a last resort."""
        n = len(self.instances)
        start = self._next % n
        self._next += 1
        rotated = self.instances[start:] + self.instances[:start]
        now = time.monotonic()
        up = [i for i in rotated if i.is_up(now)]
        down = sorted((i for i in rotated if not i.is_up(now)), key=lambda i: i.down_until)
        if self.policy == "least_loaded":
            up.sort(key=lambda i: i.in_flight)  # stable: ties keep the rotation
        return up + down

    def any_up(self) -> bool:
        return any(i.is_up() for i in self.instances)


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


class UpstreamFailure(Exception):
    """A request could not be completed upstream; becomes an OpenAI-style error.

    ``instance`` is the upstream that accepted the request and then failed it (None when
    none could be reached): a decode failure with an instance may be retried on another one.
    """

    def __init__(self, status: int, err_type: str, message: str, instance: "Instance | None" = None) -> None:
        super().__init__(message)
        self.status = status
        self.err_type = err_type
        self.message = message
        self.instance = instance


class _StreamDiverged(Exception):
    """The decode taking over a stream did not repeat the events already sent (sampling not deterministic)."""


def error_response(status: int, err_type: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": err_type, "code": status}}
    return web.json_response(body, status=status, headers=headers)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------------
# the proxy
# ---------------------------------------------------------------------------


@dataclass
class ProxyConfig:
    prefill: list[str]
    decode: list[str]
    policy: str = "round_robin"
    timeout: float = 300.0
    connect_timeout: float = 5.0
    down_time: float = 5.0
    health_timeout: float = 5.0
    decode_attempts: int = 2  # decode instances one request may try (1: no failover)


@dataclass
class _Stats:
    requests: Counter = field(default_factory=Counter)  # route -> count
    responses: Counter = field(default_factory=Counter)  # status -> count
    missing_kv_params: int = 0
    decode_failovers: int = 0  # requests moved to another decode after prefill
    failover_diverged: int = 0  # streams ended because the new decode's answer differed


class Proxy:
    """Request handlers plus the shared client session and instance pools."""

    def __init__(self, cfg: ProxyConfig) -> None:
        self.cfg = cfg
        self.prefill = InstancePool("prefill", cfg.prefill, cfg.policy)
        self.decode = InstancePool("decode", cfg.decode, cfg.policy)
        self.stats = _Stats()
        self._session: aiohttp.ClientSession | None = None
        self._parse_slots = asyncio.Semaphore(_PARSE_WORKERS)
        self._parse_pool: Any = None
        self.started = time.time()

    # -- lifecycle ---------------------------------------------------------

    async def client_ctx(self, app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        try:
            yield
        finally:
            await self._session.close()
            self._session = None
            if self._parse_pool is not None:
                self._parse_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("proxy client session not started")
        return self._session

    # -- upstream calls ----------------------------------------------------

    def _timeout(self, stream: bool) -> aiohttp.ClientTimeout:
        if stream:
            # a stream may legitimately run long; bound the silence between chunks
            return aiohttp.ClientTimeout(
                total=None, sock_connect=self.cfg.connect_timeout, sock_read=self.cfg.timeout
            )
        return aiohttp.ClientTimeout(total=self.cfg.timeout, sock_connect=self.cfg.connect_timeout)

    @contextlib.asynccontextmanager
    async def upstream(
        self,
        pool: InstancePool,
        method: str,
        path: str,
        *,
        json_body: bytes | None = None,
        headers: dict[str, str] | None = None,
        stream: bool = False,
        exclude: frozenset[str] = frozenset(),
    ) -> AsyncIterator[tuple[Instance, aiohttp.ClientResponse]]:
        """Open ``method path`` on the first instance of ``pool`` (not in ``exclude``) that
        accepts a connection; yields the instance and the response (headers read).

        Raises :class:`UpstreamFailure`: 503 when no instance could be reached,
        504 on a timeout, 502 on another client error. Only connection failures
        move on to the next instance (the request never reached the server).
        """
        unreachable: list[str] = []
        if json_body is not None:
            headers = {**(headers or {}), "Content-Type": "application/json"}
        for inst in pool.candidates():
            if inst.url in exclude:
                continue
            url = inst.url + path
            inst.requests += 1
            inst.in_flight += 1
            try:
                try:
                    resp = await self.session.request(
                        method, url, data=json_body, headers=headers, timeout=self._timeout(stream)
                    )
                except aiohttp.ConnectionTimeoutError as exc:
                    reason = f"connect timed out after {self.cfg.connect_timeout:g}s ({_describe(exc)})"
                except TimeoutError as exc:
                    inst.errors += 1
                    inst.last_error = f"timeout: {_describe(exc)}"
                    raise UpstreamFailure(
                        504, "upstream_timeout",
                        f"{pool.role} instance {inst.url} timed out after {self.cfg.timeout:g}s ({method} {path})",
                        inst,
                    ) from exc
                except aiohttp.ClientConnectionError as exc:
                    reason = _describe(exc)
                except aiohttp.ClientError as exc:
                    inst.errors += 1
                    inst.last_error = _describe(exc)
                    raise UpstreamFailure(
                        502, "upstream_error", f"{pool.role} instance {inst.url} failed: {_describe(exc)}", inst
                    ) from exc
                else:
                    inst.mark_up()
                    try:
                        yield inst, resp
                    finally:
                        resp.release()
                    return
            finally:
                inst.in_flight -= 1
            # connection failure: mark down, try the next instance
            inst.errors += 1
            inst.mark_down(reason, self.cfg.down_time)
            unreachable.append(f"{pool.role} instance {inst.url} unreachable: {reason}")
            log.warning("%s", unreachable[-1])
        if not unreachable:
            raise UpstreamFailure(503, "upstream_unavailable",
                                  f"no {pool.role} instance left to try ({len(exclude)} tried)")
        raise UpstreamFailure(503, "upstream_unavailable", "; ".join(unreachable))

    async def _read_body(self, inst: Instance, resp: aiohttp.ClientResponse) -> bytes:
        try:
            return await resp.read()
        except TimeoutError as exc:
            inst.errors += 1
            raise UpstreamFailure(
                504, "upstream_timeout",
                f"{inst.role} instance {inst.url} timed out after {self.cfg.timeout:g}s while sending its answer",
                inst,
            ) from exc
        except aiohttp.ClientError as exc:
            inst.errors += 1
            inst.last_error = _describe(exc)
            raise UpstreamFailure(
                502, "upstream_error", f"{inst.role} instance {inst.url} broke off its answer: {_describe(exc)}",
                inst,
            ) from exc

    # -- request bodies ----------------------------------------------------

    @staticmethod
    def prefill_body(body: dict[str, Any], chat: bool) -> dict[str, Any]:
        """The copy of a client request that goes to prefill."""
        req = copy.deepcopy(body)
        req["max_tokens"] = 1
        if chat:
            req["max_completion_tokens"] = 1
        req["stream"] = False
        # vLLM rejects stream_options without stream, and min_tokens > max_tokens
        req.pop("stream_options", None)
        req.pop("min_tokens", None)
        req["kv_transfer_params"] = dict(PREFILL_KV_PARAMS)
        return req

    @staticmethod
    def forward_headers(request: web.Request, request_id: str) -> dict[str, str]:
        headers = {"X-Request-Id": request_id}
        for name in _FORWARDED_HEADERS:
            if name in request.headers:
                headers[name] = request.headers[name]
        return headers

    # -- handlers ----------------------------------------------------------

    async def handle_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        path = request.path
        self.stats.requests[path] += 1
        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._done(error_response(
                413, "invalid_request_error", f"request body is larger than {_MAX_BODY} bytes"))
        except (ConnectionError, aiohttp.ClientError, asyncio.IncompleteReadError) as exc:
            # the client went away mid-body: nothing to answer, nothing worth a traceback
            log.info("request %s: client disconnected while sending its body (%s)", request_id, _describe(exc))
            return self._done(error_response(400, "invalid_request_error", "request body incomplete"))
        try:
            p_body, d_prefix, stream = await self._off_loop(len(raw) > _OFFLOAD_BYTES, _prepare, raw, chat)
        except _BadBody as exc:
            return self._done(error_response(400, "invalid_request_error", str(exc)))
        headers = self.forward_headers(request, request_id)
        t0 = time.perf_counter()
        try:
            # 1. prefill
            async with self.upstream(self.prefill, "POST", path, json_body=p_body, headers=headers) as (p_inst, p_resp):
                p_raw = await self._read_body(p_inst, p_resp)
                if p_resp.status != 200:
                    if p_resp.status >= 500:
                        p_inst.errors += 1
                    log.warning("request %s: prefill instance %s answered %d: %s",
                                request_id, p_inst.url, p_resp.status, p_raw[:500].decode(errors="replace"))
                    return self._done(web.Response(
                        body=p_raw, status=p_resp.status,
                        content_type=p_resp.content_type or "application/json",
                        headers={"X-Request-Id": request_id},
                    ))
            try:
                p_data = json.loads(p_raw)
            except ValueError as exc:
                p_inst.errors += 1
                raise UpstreamFailure(502, "upstream_error",
                                      f"prefill instance {p_inst.url} returned invalid JSON: {exc}") from exc
            kv_params = p_data.get("kv_transfer_params") if isinstance(p_data, dict) else None
            t_prefill = time.perf_counter() - t0
            if kv_params is None:
                self.stats.missing_kv_params += 1
                log.warning(
                    "request %s: prefill instance %s returned no kv_transfer_params; "
                    "forwarding to decode without them (decode will recompute the prompt)",
                    request_id, p_inst.url,
                )
            # 2. decode
            d_body = _decode_request(d_prefix, kv_params)
            if stream:
                return await self._stream_decode(request, path, d_body, headers, request_id, t0, t_prefill, p_inst)
            return await self._decode(path, d_body, headers, request_id, t0, t_prefill, p_inst)
        except UpstreamFailure as exc:
            log.error("request %s: %s", request_id, exc.message)
            extra = {"Retry-After": str(max(1, round(self.cfg.down_time)))} if exc.status == 503 else None
            return self._done(error_response(exc.status, exc.err_type, exc.message, headers=extra))

    async def _off_loop(self, big: bool, fn: Any, *args: Any) -> Any:
        """``fn(*args)``: inline for a small body, in a worker process (a few at once) for a big one."""
        if not big:
            return fn(*args)
        async with self._parse_slots:
            if self._parse_pool is None:
                import concurrent.futures
                import multiprocessing

                self._parse_pool = concurrent.futures.ProcessPoolExecutor(
                    _PARSE_WORKERS, mp_context=multiprocessing.get_context("spawn"))
            return await asyncio.get_running_loop().run_in_executor(self._parse_pool, fn, *args)

    def _failover(self, request_id: str, exc: UpstreamFailure, tried: set[str], attempt: int,
                  events: int = 0) -> bool:
        """Whether the decode failure ``exc`` moves the request to another decode instance (logged, counted)."""
        inst = exc.instance
        if inst is None or inst.role != "decode":
            return False
        tried.add(inst.url)
        if attempt + 1 >= self.cfg.decode_attempts or all(i.url in tried for i in self.decode.instances):
            return False
        inst.mark_down(exc.message, self.cfg.down_time)
        self.stats.decode_failovers += 1
        after = f" after {events} events were sent" if events else ""
        log.warning("request %s: %s%s; retrying on another decode instance with the same kv_transfer_params "
                    "(prefill is not repeated)", request_id, exc.message, after)
        return True

    async def _decode(self, path: str, d_body: bytes, headers: dict[str, str], request_id: str, t0: float,
                      t_prefill: float, p_inst: Instance) -> web.Response:
        """Decode's whole answer; a failed decode (5xx, broken or silent answer) moves to another one."""
        tried: set[str] = set()
        attempt = 0
        while True:
            try:
                async with self.upstream(self.decode, "POST", path, json_body=d_body, headers=headers,
                                         exclude=frozenset(tried)) as (d_inst, d_resp):
                    tried.add(d_inst.url)
                    d_raw = await self._read_body(d_inst, d_resp)
                    if d_resp.status >= 500:
                        d_inst.errors += 1
                        failed = UpstreamFailure(d_resp.status, "upstream_error",
                                                 f"decode instance {d_inst.url} answered {d_resp.status}", d_inst)
                        if self._failover(request_id, failed, tried, attempt):
                            attempt += 1
                            continue
                    log.debug("request %s: prefill %s %.3fs, decode %s %.3fs, status %d", request_id, p_inst.url,
                              t_prefill, d_inst.url, time.perf_counter() - t0 - t_prefill, d_resp.status)
                    return self._done(web.Response(
                        body=d_raw, status=d_resp.status,
                        content_type=d_resp.content_type or "application/json",
                        headers={"X-Request-Id": request_id},
                    ))
            except UpstreamFailure as exc:
                if not self._failover(request_id, exc, tried, attempt):
                    raise
                attempt += 1

    async def _stream_decode(
        self,
        request: web.Request,
        path: str,
        d_body: bytes,
        headers: dict[str, str],
        request_id: str,
        t0: float,
        t_prefill: float,
        p_inst: Instance,
    ) -> web.StreamResponse:
        """Pass decode's SSE stream through; a decode failing before or during it moves to another one."""
        out: web.StreamResponse | None = None
        sent: list[bytes] = []  # the SSE events forwarded so far
        tried: set[str] = set()
        attempt = 0
        while True:
            try:
                async with self.upstream(self.decode, "POST", path, json_body=d_body, headers=headers, stream=True,
                                         exclude=frozenset(tried)) as (d_inst, d_resp):
                    tried.add(d_inst.url)
                    if d_resp.status != 200:
                        d_raw = await self._read_body(d_inst, d_resp)
                        why = f"decode instance {d_inst.url} answered {d_resp.status}: " + \
                            d_raw[:300].decode(errors="replace")
                        if d_resp.status >= 500:
                            d_inst.errors += 1
                            if self._failover(request_id, UpstreamFailure(502, "upstream_error", why, d_inst),
                                              tried, attempt, len(sent)):
                                attempt += 1
                                continue
                        if out is not None:  # the stream already began: it ends with an error event
                            raise UpstreamFailure(502, "upstream_error", why)
                        return self._done(web.Response(
                            body=d_raw, status=d_resp.status,
                            content_type=d_resp.content_type or "application/json",
                            headers={"X-Request-Id": request_id},
                        ))
                    if out is None:
                        out = web.StreamResponse(status=200, headers={
                            "Content-Type": d_resp.headers.get("Content-Type", "text/event-stream"),
                            "Cache-Control": "no-cache",
                            "X-Request-Id": request_id,
                        })
                        await out.prepare(request)
                        self.stats.responses[200] += 1
                    if not await self._relay(out, d_inst, d_resp, sent):
                        log.info("request %s: client disconnected during the stream; aborting decode", request_id)
                        d_resp.close()  # closing upstream makes vLLM abort the request
                        return out
                    log.debug("request %s: prefill %s %.3fs, decode %s stream %.3fs", request_id, p_inst.url,
                              t_prefill, d_inst.url, time.perf_counter() - t0 - t_prefill)
                    msg = None
            except _StreamDiverged as exc:
                self.stats.failover_diverged += 1
                msg, err_type = str(exc), "upstream_error"
            except UpstreamFailure as exc:
                if self._failover(request_id, exc, tried, attempt, len(sent)):
                    attempt += 1
                    continue
                if out is None:
                    raise
                msg, err_type = exc.message, exc.err_type
            if msg is not None:
                log.error("request %s: %s", request_id, msg)
                event = {"error": {"message": msg, "type": err_type, "code": 502}}
                with contextlib.suppress(ConnectionResetError):
                    await out.write(f"data: {json.dumps(event)}\n\n".encode())
            with contextlib.suppress(ConnectionResetError):
                await out.write_eof()
            return out

    async def _relay(self, out: web.StreamResponse, d_inst: Instance, d_resp: aiohttp.ClientResponse,
                     sent: list[bytes]) -> bool:
        """Forward decode's stream to ``out`` in whole SSE events, appending each to ``sent``.

        A retry's first ``len(sent)`` events are checked against ``sent`` and dropped (raises
        :class:`_StreamDiverged` when they differ or the stream ends first). Returns False when the
        client went away; raises :class:`UpstreamFailure` (with the instance) when decode breaks
        off, stays silent past ``--timeout`` or sends an error event.
        """
        skip, seen, buf = len(sent), 0, b""
        resync = _TextResync(sent) if _TextResync.usable(sent) else None
        if resync is not None:
            skip = 0  # checked by text (below), not event by event
        try:
            async for chunk in d_resp.content.iter_any():
                buf += chunk
                while (cut := buf.find(b"\n\n")) >= 0:
                    event, buf = buf[:cut + 2], buf[cut + 2:]
                    if resync is not None and not resync.done and _error_event(event) is None:
                        forward = resync.feed(event, d_inst.url)
                        if forward is None:
                            continue
                        event = forward
                    if seen < skip:
                        if _event_choices(event) != _event_choices(sent[seen]):
                            raise _StreamDiverged(
                                f"decode failover: decode instance {d_inst.url} does not repeat event {seen} of "
                                f"the {skip} already sent (sampling is not deterministic); the answer is incomplete")
                        seen += 1
                        continue
                    err = _error_event(event)
                    if err is not None:
                        d_inst.errors += 1
                        raise UpstreamFailure(502, "upstream_error",
                                              f"decode instance {d_inst.url} sent an error event: {err}", d_inst)
                    seen += 1
                    if not await _write(out, event):
                        return False
                    sent.append(event)
        except TimeoutError as exc:
            d_inst.errors += 1
            raise UpstreamFailure(504, "upstream_timeout",
                                  f"decode instance {d_inst.url} sent nothing for {self.cfg.timeout:g}s", d_inst) from exc
        except aiohttp.ClientError as exc:
            d_inst.errors += 1
            d_inst.last_error = f"broke off the stream: {_describe(exc)}"
            raise UpstreamFailure(502, "upstream_error",
                                  f"decode instance {d_inst.url} broke off the stream: {_describe(exc)}",
                                  d_inst) from exc
        if resync is not None and not resync.done:
            raise _StreamDiverged(f"decode failover: decode instance {d_inst.url} ended its stream before repeating "
                                  f"the text already sent; the answer is incomplete")
        if seen < skip:
            raise _StreamDiverged(f"decode failover: decode instance {d_inst.url} ended its stream after {seen} "
                                  f"events, before repeating the {skip} already sent; the answer is incomplete")
        return not buf or await _write(out, buf)  # a last event without its blank line

    def _done(self, resp: web.Response) -> web.Response:
        self.stats.responses[resp.status] += 1
        return resp

    async def handle_models(self, request: web.Request) -> web.Response:
        self.stats.requests[request.path] += 1
        headers = self.forward_headers(request, request.headers.get("X-Request-Id") or uuid.uuid4().hex)
        try:
            async with self.upstream(self.decode, "GET", "/v1/models", headers=headers) as (inst, resp):
                raw = await self._read_body(inst, resp)
                return self._done(web.Response(
                    body=raw, status=resp.status, content_type=resp.content_type or "application/json"
                ))
        except UpstreamFailure as exc:
            log.error("/v1/models: %s", exc.message)
            return self._done(error_response(exc.status, exc.err_type, exc.message))

    async def _probe(self, inst: Instance) -> None:
        timeout = aiohttp.ClientTimeout(total=min(self.cfg.health_timeout, self.cfg.timeout))
        try:
            async with self.session.get(inst.url + "/health", timeout=timeout) as resp:
                await resp.read()
                if resp.status == 200:
                    inst.mark_up()
                    return
                reason = f"/health answered {resp.status}"
        except (TimeoutError, aiohttp.ClientError) as exc:
            reason = f"/health failed: {_describe(exc)}"
        inst.mark_down(reason, self.cfg.down_time)

    async def handle_health(self, request: web.Request) -> web.Response:
        insts = self.prefill.instances + self.decode.instances
        await asyncio.gather(*(self._probe(i) for i in insts))
        ok = self.prefill.any_up() and self.decode.any_up()
        body = {
            "status": "ok" if ok else "unavailable",
            "policy": self.cfg.policy,
            "prefill": [i.status() for i in self.prefill.instances],
            "decode": [i.status() for i in self.decode.instances],
        }
        return web.json_response(body, status=200 if ok else 503)

    def metrics_dict(self) -> dict[str, Any]:
        return {
            "uptime_s": round(time.time() - self.started, 3),
            "requests": dict(self.stats.requests),
            "responses": {str(k): v for k, v in sorted(self.stats.responses.items())},
            "missing_kv_transfer_params": self.stats.missing_kv_params,
            "decode_failovers": self.stats.decode_failovers,
            "failover_diverged": self.stats.failover_diverged,
            "prefill": [i.status() for i in self.prefill.instances],
            "decode": [i.status() for i in self.decode.instances],
        }

    async def handle_metrics(self, request: web.Request) -> web.Response:
        if request.query.get("format") == "json":
            return web.json_response(self.metrics_dict())
        lines = [
            "# TYPE ucxkv_proxy_requests_total counter",
            *(f'ucxkv_proxy_requests_total{{route="{r}"}} {n}' for r, n in sorted(self.stats.requests.items())),
            "# TYPE ucxkv_proxy_responses_total counter",
            *(f'ucxkv_proxy_responses_total{{status="{s}"}} {n}' for s, n in sorted(self.stats.responses.items())),
            "# TYPE ucxkv_proxy_missing_kv_transfer_params_total counter",
            f"ucxkv_proxy_missing_kv_transfer_params_total {self.stats.missing_kv_params}",
            "# TYPE ucxkv_proxy_decode_failovers_total counter",
            f"ucxkv_proxy_decode_failovers_total {self.stats.decode_failovers}",
            "# TYPE ucxkv_proxy_failover_diverged_total counter",
            f"ucxkv_proxy_failover_diverged_total {self.stats.failover_diverged}",
        ]
        insts = self.prefill.instances + self.decode.instances
        for metric, kind, get in (
            ("upstream_requests_total", "counter", lambda i: i.requests),
            ("upstream_errors_total", "counter", lambda i: i.errors),
            ("upstream_in_flight", "gauge", lambda i: i.in_flight),
            ("upstream_up", "gauge", lambda i: int(i.is_up())),
        ):
            lines.append(f"# TYPE ucxkv_proxy_{metric} {kind}")
            lines.extend(f'ucxkv_proxy_{metric}{{role="{i.role}",instance="{i.url}"}} {get(i)}' for i in insts)
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


def build_app(cfg: ProxyConfig) -> web.Application:
    """The aiohttp application serving the proxy routes."""
    proxy = Proxy(cfg)
    app = web.Application(client_max_size=_MAX_BODY)
    app["proxy"] = proxy
    app.cleanup_ctx.append(proxy.client_ctx)
    app.router.add_post("/v1/completions", proxy.handle_completions)
    app.router.add_post("/v1/chat/completions", proxy.handle_chat)
    app.router.add_get("/v1/models", proxy.handle_models)
    app.router.add_get("/health", proxy.handle_health)
    app.router.add_get("/metrics", proxy.handle_metrics)
    return app


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------


def normalize_url(text: str) -> str:
    """``host:port`` or ``http://host:port/`` -> ``http://host:port``."""
    url = text.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    scheme, _, rest = url.partition("://")
    if scheme not in ("http", "https") or not rest:
        raise argparse.ArgumentTypeError(f"not an http(s) URL: {text!r}")
    return url


def _url_list(values: Sequence[Sequence[str]] | None) -> list[str]:
    urls: list[str] = []
    for group in values or ():
        for value in group:
            for part in value.replace(",", " ").split():
                url = normalize_url(part)
                if url not in urls:
                    urls.append(url)
    return urls


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ucxkv-proxy",
        description="OpenAI-compatible proxy for vLLM disaggregated prefill/decode: "
        "prefill with max_tokens=1, hand kv_transfer_params to decode, return decode's answer.",
    )
    parser.add_argument("--prefill", action="append", nargs="+", metavar="URL", required=True,
                        help="prefill instance(s), http://host:port; repeat the flag or give a comma list")
    parser.add_argument("--decode", action="append", nargs="+", metavar="URL", required=True,
                        help="decode instance(s), http://host:port; repeat the flag or give a comma list")
    parser.add_argument("--policy", choices=POLICIES, default="round_robin",
                        help="how to pick an instance: round_robin, or least_loaded (fewest in-flight requests)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default 8000)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds for one upstream call; for streams, the longest gap between chunks (default 300)")
    parser.add_argument("--connect-timeout", type=float, default=5.0,
                        help="seconds to connect to an upstream instance (default 5)")
    parser.add_argument("--down-time", type=float, default=5.0,
                        help="seconds an unreachable instance is skipped before it is tried again (default 5)")
    parser.add_argument("--decode-attempts", type=int, default=2,
                        help="decode instances one request may try when decode fails after prefill (5xx, broken "
                        "or silent answer, error event); prefill is not repeated. 1: no failover (default 2)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    args = parser.parse_args(argv)
    try:
        args.prefill = _url_list(args.prefill)
        args.decode = _url_list(args.decode)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if not args.prefill:
        parser.error("--prefill: no URL given")
    if not args.decode:
        parser.error("--decode: no URL given")
    if args.decode_attempts < 1:
        parser.error("--decode-attempts must be at least 1")
    for name in ("timeout", "connect_timeout"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


async def _serve(args: argparse.Namespace) -> None:
    cfg = ProxyConfig(
        prefill=args.prefill, decode=args.decode, policy=args.policy, timeout=args.timeout,
        connect_timeout=args.connect_timeout, down_time=args.down_time, decode_attempts=args.decode_attempts,
    )
    app = build_app(cfg)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else args.port
    log.info("prefill instances: %s", ", ".join(cfg.prefill))
    log.info("decode instances: %s", ", ".join(cfg.decode))
    log.info("policy %s, timeout %gs, connect timeout %gs", cfg.policy, cfg.timeout, cfg.connect_timeout)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"ucxkv-proxy listening on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``ucxkv-proxy``."""
    args = parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", args.host, args.port, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
