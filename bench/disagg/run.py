"""``python -m bench.disagg``: one vLLM instance vs 1P1D through ``UcxConnector``.

For each configuration the benchmark starts fresh vLLM servers on this machine
(with the helpers of :mod:`bench.demo`), sends a few warm-up requests, then for
each request rate a Poisson load of mixed long and short prompts as *streaming*
completions, and measures on the client:

* TTFT: request sent -> first token received (the first SSE event carrying text);
* ITL: the gaps between successive tokens of one request, pooled over all
  requests of a rate (as vLLM's own serving benchmark does).

Configurations:

* ``single``: one vLLM instance (``VLLM_CPU_OMP_THREADS_BIND=--single-cpus``,
  default ``0-1``: both cores, the same hardware as the pair), asked directly.
* ``single-1c``: the same single instance bound to one core (``--single-1c-cpus``,
  default ``0``): on a 2-core host a 2-thread OpenMP engine shares its cores with
  its own API server, the load generator and the OS, which can cost it more
  than the second core gives; this row shows that effect instead of hiding it.
* ``1p1d``: a prefill instance on core ``--prefill-cpus`` (0) and a decode
  instance on core ``--decode-cpus`` (1), wired with ``UcxConnector``, with the
  ``kv_transfer.proxy`` in front; the client talks to the proxy.

Where TTFT goes in 1P1D comes from two sources, both per rate:

* the proxy (run at DEBUG) logs how long the prefill leg took for each request
  (request id set by the client), so ``prefill leg`` is measured per request;
* the decode server logs vLLM's KV-connector statistics (``VLLM_LOG_STATS_INTERVAL``
  seconds apart), with our ``load_s`` / ``requests_loaded`` / ``bytes_loaded``:
  ``load_s`` is the time decode's load thread spent fetching a request's KV from
  prefill over UCX and scattering it into its blocks. ``xfer`` is the mean of it
  per request, and ``xfer %`` that mean over the mean TTFT.

Output: a table on stdout, ``results.json`` and ``result.png`` (p99 TTFT and
p99 ITL against rate, both configurations) in ``--out`` (default ``out/disagg``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.demo import ROOT, _free_port, _vllm, _wait_health
from bench.tiny_model import make_tiny_model, sample_prompts

__all__ = [
    "RequestResult",
    "format_table",
    "main",
    "make_workload",
    "parse_args",
    "parse_connector_stats",
    "parse_proxy_prefill",
    "percentile",
    "summarize_rate",
    "to_json",
]

CONFIGS = ("single", "single-1c", "1p1d")

#: the model shape used by default: prefill of a ~450-token prompt costs about a
#: second on one core, a decode step tens of milliseconds
MODEL_SHAPE = {"num_layers": 8, "hidden_size": 1024, "num_heads": 8, "num_kv_heads": 4, "head_dim": 128,
               "intermediate_size": 2816}

#: bench.demo._vllm starts servers with --max-model-len 512
MAX_MODEL_LEN = 512


# ---------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not vals or any(not v > 0 or math.isinf(v) for v in vals):
        raise argparse.ArgumentTypeError(f"rates must be positive finite numbers: {text!r}")
    return vals


def _word_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        a, b = int(lo), int(hi if sep else lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX words, got {text!r}") from None
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError(f"need 1 <= MIN <= MAX, got {text!r}")
    return a, b


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.disagg", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "out" / "disagg"),
                    help="output directory: results.json, result.png, server logs, the model (default out/disagg)")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help="comma list of configurations to run: single, single-1c, 1p1d (default all)")
    ap.add_argument("--rates", type=_floats, default=[0.5, 1.0, 2.0],
                    help="request rates in requests/s, comma list (default 0.5,1,2)")
    ap.add_argument("--duration", type=float, default=40.0,
                    help="seconds of arrivals per rate: requests = max(--min-requests, rate * duration) (default 40)")
    ap.add_argument("--min-requests", type=int, default=12, help="fewest requests per rate (default 12)")
    ap.add_argument("--long-fraction", type=float, default=0.3, help="share of long prompts (default 0.3)")
    ap.add_argument("--long-words", type=_word_range, default=(400, 460),
                    help="long prompt length in words = tokens, MIN:MAX (default 400:460)")
    ap.add_argument("--short-words", type=_word_range, default=(16, 48),
                    help="short prompt length in words = tokens, MIN:MAX (default 16:48)")
    ap.add_argument("--max-tokens", type=int, default=40, help="tokens generated per request (default 40)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up requests per configuration (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="workload seed; each rate gets its own prompts")
    ap.add_argument("--single-cpus", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND of the single instance (0-1)")
    ap.add_argument("--single-1c-cpus", default="0", help="VLLM_CPU_OMP_THREADS_BIND of single-1c (0)")
    ap.add_argument("--prefill-cpus", default="0", help="VLLM_CPU_OMP_THREADS_BIND of prefill (0)")
    ap.add_argument("--decode-cpus", default="1", help="VLLM_CPU_OMP_THREADS_BIND of decode (1)")
    ap.add_argument("--stats-interval", type=float, default=2.0,
                    help="VLLM_LOG_STATS_INTERVAL of the servers, seconds (default 2)")
    ap.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request (default 300)")
    ap.add_argument("--server-timeout", type=float, default=600.0, help="seconds to wait for a server (default 600)")
    ap.add_argument("--model", default=None,
                    help="model directory; default: build the benchmark's tiny model under OUT/model")
    args = ap.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad or not configs:
        ap.error(f"--configs: unknown {bad or args.configs!r}; choose from {', '.join(CONFIGS)}")
    args.configs = configs
    if not 0.0 <= args.long_fraction <= 1.0:
        ap.error("--long-fraction must be in [0, 1]")
    if args.max_tokens < 2:
        ap.error("--max-tokens must be >= 2 (ITL needs two tokens)")
    if max(args.long_words[1], args.short_words[1]) + 1 + args.max_tokens > MAX_MODEL_LEN:
        ap.error(f"longest prompt (+<s>) + --max-tokens must fit the servers' max model length {MAX_MODEL_LEN}")
    for name in ("duration", "stats_interval", "request_timeout", "server_timeout"):
        if not getattr(args, name) > 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if args.min_requests < 1 or args.warmup < 0:
        ap.error("--min-requests must be >= 1 and --warmup >= 0")
    return args


# ---------------------------------------------------------------------------
# workload
# ---------------------------------------------------------------------------


@dataclass
class Request:
    at: float  # seconds after the start of the rate
    kind: str  # "long" | "short"
    prompt: str


def make_workload(n: int, rate: float, long_fraction: float, long_words: tuple[int, int],
                  short_words: tuple[int, int], seed: int) -> list[Request]:
    """``n`` requests with Poisson arrivals at ``rate``/s; ``round(n * long_fraction)``
    of them long, in random order. Deterministic for a given seed."""
    rng = random.Random(seed)
    n_long = round(n * long_fraction)
    kinds = ["long"] * n_long + ["short"] * (n - n_long)
    rng.shuffle(kinds)
    out: list[Request] = []
    t = 0.0
    for i, kind in enumerate(kinds):
        lo, hi = long_words if kind == "long" else short_words
        prompt = sample_prompts(1, lo, hi, seed=seed * 100_003 + i)[0]
        out.append(Request(at=t, kind=kind, prompt=prompt))
        t += rng.expovariate(rate)
    return out


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between closest
    ranks (numpy's default); NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


@dataclass
class RequestResult:
    request_id: str
    kind: str
    ok: bool = False
    error: str | None = None
    ttft: float = math.nan  # seconds
    itls: list[float] = field(default_factory=list)  # seconds
    tokens: int = 0  # SSE events that carried text (an event can carry more than one token)
    usage_tokens: int | None = None  # completion tokens the server reports (stream_options.include_usage)
    e2e: float = math.nan
    prefill_leg: float | None = None  # from the proxy log (1p1d only)


def summarize_rate(config: str, rate: float, results: Sequence[RequestResult], wall_s: float,
                   connector: dict[str, float] | None = None) -> dict[str, Any]:
    """One row of the result table: latencies in milliseconds."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    itl = [x for r in ok for x in r.itls]
    ms = 1000.0

    def pct(xs: Sequence[float], q: float) -> float:
        return round(percentile(xs, q) * ms, 1) if xs else math.nan

    row: dict[str, Any] = {
        "config": config,
        "rate": rate,
        "requests": len(results),
        "ok": len(ok),
        "long": sum(r.kind == "long" for r in results),
        "wall_s": round(wall_s, 1),
        "tokens": sum(r.tokens for r in ok),  # text events; < usage_tokens when events carried 2+ tokens
        "usage_tokens": sum(r.usage_tokens or 0 for r in ok),
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p99_ms": pct(ttft, 99),
        "ttft_mean_ms": round(_mean(ttft) * ms, 1) if ttft else math.nan,
        "ttft_long_p50_ms": pct([r.ttft for r in ok if r.kind == "long"], 50),
        "ttft_short_p50_ms": pct([r.ttft for r in ok if r.kind == "short"], 50),
        "itl_p50_ms": pct(itl, 50),
        "itl_p99_ms": pct(itl, 99),
        "itl_max_ms": round(max(itl) * ms, 1) if itl else math.nan,
        "errors": sorted({r.error for r in results if r.error})[:5],
    }
    legs = [r.prefill_leg for r in ok if r.prefill_leg is not None]
    row["prefill_leg_mean_ms"] = round(_mean(legs) * ms, 1) if legs else None
    row["prefill_leg_share"] = (round(_mean(legs) / _mean(ttft), 3) if legs and ttft else None)
    if connector is not None:
        n = int(connector.get("requests_loaded", 0))
        row["kv_requests_loaded"] = n
        row["kv_load_failures"] = int(connector.get("load_failures", 0))
        row["kv_bytes_loaded"] = int(connector.get("bytes_loaded", 0))
        mean_load = connector.get("load_s", 0.0) / n if n else math.nan
        row["xfer_mean_ms"] = round(mean_load * ms, 2) if n else None
        row["xfer_MiBps"] = (round(connector["bytes_loaded"] / connector["load_s"] / 2**20, 1)
                             if n and connector.get("load_s") else None)
        row["xfer_share"] = round(mean_load / _mean(ttft), 4) if n and ttft else None
    else:
        row.update(kv_requests_loaded=None, kv_load_failures=None, kv_bytes_loaded=None, xfer_mean_ms=None,
                   xfer_MiBps=None, xfer_share=None)
    return row


# ---------------------------------------------------------------------------
# log parsing
# ---------------------------------------------------------------------------

_ADDITIVE = ("bytes_saved", "requests_saved", "save_s", "bytes_loaded", "requests_loaded", "load_s",
             "load_failures", "save_failures")
_KV_LINE = re.compile(r"KV Transfer metrics:\s*(.*)$")
_PROXY_LINE = re.compile(r"request (\S+): prefill \S+ ([0-9.]+)s, decode ")


def parse_connector_stats(text: str) -> dict[str, float]:
    """Sum the additive ``UcxConnector`` counters over every ``KV Transfer
    metrics:`` line vLLM logged in ``text`` (each line covers one interval)."""
    total: dict[str, float] = {k: 0 for k in _ADDITIVE}
    total["lines"] = 0
    for line in text.splitlines():
        m = _KV_LINE.search(line)
        if not m:
            continue
        total["lines"] += 1
        for part in m.group(1).split(","):
            key, sep, val = part.strip().partition("=")
            if sep and key in _ADDITIVE:
                try:
                    total[key] += float(val)
                except ValueError:
                    pass
    return total


def parse_proxy_prefill(text: str) -> dict[str, float]:
    """request id -> seconds of the prefill leg, from the proxy's DEBUG log."""
    return {m.group(1): float(m.group(2)) for m in map(_PROXY_LINE.search, text.splitlines()) if m}


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------

_COLUMNS = (
    ("config", "config", "{}"),
    ("rate", "req/s", "{:g}"),
    ("ok", "ok", "{}"),
    ("requests", "n", "{}"),
    ("ttft_p50_ms", "TTFT p50", "{:.0f}"),
    ("ttft_p99_ms", "TTFT p99", "{:.0f}"),
    ("itl_p50_ms", "ITL p50", "{:.1f}"),
    ("itl_p99_ms", "ITL p99", "{:.1f}"),
    ("prefill_leg_share", "prefill leg %", "{:.0%}"),
    ("xfer_mean_ms", "xfer ms", "{:.1f}"),
    ("xfer_share", "xfer %", "{:.1%}"),
)


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The result table (latencies in ms), one line per configuration and rate."""
    head = [h for _, h, _ in _COLUMNS]
    body = [[_cell(r.get(k), f) for k, _, f in _COLUMNS] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for b in body:
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(b, widths))))
    return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def to_json(meta: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """Strict JSON (NaN becomes null) of the run's settings and rows."""
    return json.dumps(_jsonable({"meta": meta, "rows": list(rows)}), indent=2, sort_keys=False, allow_nan=False)


def plot(rows: Sequence[dict[str, Any]], path: pathlib.Path, title: str = "") -> None:
    """p99 TTFT and p99 ITL (p50 dashed) against request rate, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - used through matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.9), dpi=80)
    styles = {"single": ("tab:red", "o"), "single-1c": ("tab:orange", "^"), "1p1d": ("tab:blue", "s")}
    for ax, metric, label in ((axes[0], "ttft", "TTFT (ms)"), (axes[1], "itl", "ITL (ms)")):
        for cfg in dict.fromkeys(r["config"] for r in rows):
            rs = sorted((r for r in rows if r["config"] == cfg), key=lambda r: r["rate"])
            color, marker = styles.get(cfg, ("tab:gray", "^"))
            x = [r["rate"] for r in rs]
            ax.plot(x, [r[f"{metric}_p99_ms"] for r in rs], marker=marker, color=color, label=f"{cfg} p99")
            ax.plot(x, [r[f"{metric}_p50_ms"] for r in rs], marker=marker, color=color, ls="--", alpha=0.6,
                    label=f"{cfg} p50")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, alpha=0.3, which="both")
        ax.set_title(label.split()[0])
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------
# the load generator
# ---------------------------------------------------------------------------


async def _one(session: Any, url: str, model: str, req: Request, max_tokens: int, timeout: float,
               t_start: float) -> RequestResult:
    import aiohttp

    rid = f"disagg-{uuid.uuid4().hex[:16]}"
    res = RequestResult(request_id=rid, kind=req.kind)
    await asyncio.sleep(max(0.0, t_start + req.at - time.perf_counter()))
    body = {"model": model, "prompt": req.prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    last = None
    try:
        async with session.post(url, json=body, headers={"X-Request-Id": rid},
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    res.error = str(event["error"])[:200]
                    return res
                usage = event.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    res.usage_tokens = int(usage["completion_tokens"])
                choices = event.get("choices") or []
                if not choices or not choices[0].get("text"):
                    continue
                now = time.perf_counter()
                if last is None:
                    res.ttft = now - t0
                else:
                    res.itls.append(now - last)
                last = now
                res.tokens += 1
        res.e2e = time.perf_counter() - t0
        res.ok = res.tokens > 0
        if not res.ok:
            res.error = "no tokens streamed"
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:200]
    return res


async def run_load(url: str, model: str, workload: Sequence[Request], max_tokens: int,
                   timeout: float) -> tuple[list[RequestResult], float]:
    """Send ``workload`` (open loop: each request leaves at its arrival time,
    whatever the others are doing); returns the results and the wall time."""
    import aiohttp

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        t_start = time.perf_counter() + 0.05
        results = await asyncio.gather(*(_one(session, url, model, r, max_tokens, timeout, t_start)
                                         for r in workload))
    return list(results), time.perf_counter() - t_start


# ---------------------------------------------------------------------------
# servers
# ---------------------------------------------------------------------------


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(10)


def _start(config: str, model: str, args: argparse.Namespace, logdir: pathlib.Path
           ) -> tuple[list[subprocess.Popen], str, pathlib.Path | None, pathlib.Path | None]:
    """Start one configuration; returns processes, the URL clients use, the
    decode log and the proxy log (None for single)."""
    procs: list[subprocess.Popen] = []
    try:
        if config.startswith("single"):
            port = _free_port()
            cpus = args.single_cpus if config == "single" else args.single_1c_cpus
            # the connector is configured (role kv_consumer, as bench.demo's single-instance answers)
            # but idle: no request carries kv_transfer_params
            p = _vllm(model, port, "kv_consumer", _free_port(), cpus, logdir / f"{config}.log")
            procs.append(p)
            _wait_health(config, f"http://127.0.0.1:{port}", p, args.server_timeout)
            return procs, f"http://127.0.0.1:{port}", None, None
        p_port, d_port, x_port, kv_port = (_free_port() for _ in range(4))
        prefill = _vllm(model, p_port, "kv_producer", kv_port, args.prefill_cpus, logdir / "prefill.log")
        procs.append(prefill)
        decode = _vllm(model, d_port, "kv_consumer", kv_port, args.decode_cpus, logdir / "decode.log")
        procs.append(decode)
        proxy_log = logdir / "proxy.log"
        proxy = subprocess.Popen(
            [sys.executable, "-m", "kv_transfer.proxy", "--port", str(x_port), "--log-level", "DEBUG",
             "--timeout", str(args.request_timeout),
             "--prefill", f"http://127.0.0.1:{p_port}", "--decode", f"http://127.0.0.1:{d_port}"],
            stdout=proxy_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"))
        procs.append(proxy)
        _wait_health("prefill", f"http://127.0.0.1:{p_port}", prefill, args.server_timeout)
        _wait_health("decode", f"http://127.0.0.1:{d_port}", decode, args.server_timeout)
        _wait_health("proxy", f"http://127.0.0.1:{x_port}", proxy, 60)
        return procs, f"http://127.0.0.1:{x_port}", logdir / "decode.log", proxy_log
    except BaseException:
        _stop(procs)
        raise


def _n_requests(rate: float, args: argparse.Namespace) -> int:
    return max(args.min_requests, round(rate * args.duration))


def run_config(config: str, model: str, args: argparse.Namespace, out: pathlib.Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    print(f"[{config}] starting servers ...", flush=True)
    procs, base, decode_log, proxy_log = _start(config, model, args, out)
    url = base + "/v1/completions"
    flush_wait = 2 * args.stats_interval + 1.0
    try:
        print(f"[{config}] up in {time.monotonic() - t0:.0f}s; warming up", flush=True)
        if args.warmup:
            warm = make_workload(args.warmup, 1.0, 0.5, args.long_words, args.short_words, seed=10_000 + args.seed)
            for r in warm:
                r.at = 0.0
            res, _ = asyncio.run(run_load(url, model, warm, args.max_tokens, args.request_timeout))
            if not any(r.ok for r in res):
                raise SystemExit(f"[{config}] warm-up failed: {[r.error for r in res]}")
            time.sleep(flush_wait)
        for i, rate in enumerate(args.rates):
            wl = make_workload(_n_requests(rate, args), rate, args.long_fraction, args.long_words,
                               args.short_words, seed=args.seed * 1000 + i)
            offset = decode_log.stat().st_size if decode_log else 0
            results, wall = asyncio.run(run_load(url, model, wl, args.max_tokens, args.request_timeout))
            connector = None
            if decode_log is not None:
                time.sleep(flush_wait)  # let vLLM log the interval's connector stats
                with decode_log.open("rb") as f:
                    f.seek(offset)
                    connector = parse_connector_stats(f.read().decode(errors="replace"))
                legs = parse_proxy_prefill(proxy_log.read_text(errors="replace"))
                for r in results:
                    r.prefill_leg = legs.get(r.request_id)
            row = summarize_rate(config, rate, results, wall, connector)
            row["loadavg_1m"] = round(os.getloadavg()[0], 2)  # the host is shared: how busy it was
            row["raw"] = [{"kind": r.kind, "ok": r.ok, "ttft_ms": round(r.ttft * 1000, 2),
                           "itl_max_ms": round(max(r.itls) * 1000, 2) if r.itls else None,
                           "tokens": r.tokens, "usage_tokens": r.usage_tokens,
                           "prefill_leg_ms": None if r.prefill_leg is None else round(r.prefill_leg * 1000, 2)}
                          for r in results]
            rows.append(row)
            print(f"[{config}] rate {rate:g}/s: {row['ok']}/{row['requests']} ok in {wall:.0f}s, "
                  f"TTFT p50/p99 {row['ttft_p50_ms']}/{row['ttft_p99_ms']} ms, "
                  f"ITL p50/p99 {row['itl_p50_ms']}/{row['itl_p99_ms']} ms"
                  + (f", KV loaded for {row['kv_requests_loaded']} requests, mean {row['xfer_mean_ms']} ms"
                     if connector is not None else ""), flush=True)
    finally:
        _stop(procs)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["VLLM_LOG_STATS_INTERVAL"] = str(args.stats_interval)  # inherited by the servers
    model = args.model or str(make_tiny_model(out / "model", **MODEL_SHAPE))
    plan = {r: _n_requests(r, args) for r in args.rates}
    print(f"model: {model}\nrates (req/s -> requests): {plan}; long prompts {args.long_words} words "
          f"({args.long_fraction:.0%}), short {args.short_words}; {args.max_tokens} tokens each", flush=True)
    t0 = time.monotonic()
    rows: list[dict[str, Any]] = []
    for config in args.configs:
        rows += run_config(config, model, args, out)
    meta = {
        "command": " ".join(["python -m bench.disagg", *(sys.argv[1:] if argv is None else argv)]),
        "model": model,
        "model_shape": MODEL_SHAPE if args.model is None else None,
        "cpus": {"single": args.single_cpus, "single-1c": args.single_1c_cpus, "prefill": args.prefill_cpus, "decode": args.decode_cpus},
        "host_cpus": os.cpu_count(),
        "max_tokens": args.max_tokens,
        "long_fraction": args.long_fraction,
        "long_words": args.long_words,
        "short_words": args.short_words,
        "requests_per_rate": {str(k): v for k, v in plan.items()},
        "seed": args.seed,
        "total_s": round(time.monotonic() - t0, 1),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / "results.json").write_text(to_json(meta, rows) + "\n")
    png = out / "result.png"
    plot(rows, png, title=f"vLLM-CPU, {os.cpu_count()} cores: single ({args.single_cpus}), single-1c "
                          f"({args.single_1c_cpus}) vs 1P1D "
                          f"(prefill {args.prefill_cpus}, decode {args.decode_cpus}) via UcxConnector")
    print()
    print(format_table(rows))
    print("\nlatencies in ms; prefill leg % = mean prefill leg at the proxy / mean TTFT; xfer = mean KV load "
          "on decode (UcxConnector load_s / requests_loaded), xfer % = xfer / mean TTFT")
    print(f"\nwrote {out / 'results.json'}, {png} ({meta['total_s']:.0f}s)")
    failed = sum(r["requests"] - r["ok"] for r in rows)
    return 1 if failed else 0
