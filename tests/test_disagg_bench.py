"""Fast checks of bench.disagg that need no vLLM: arguments, statistics, log
parsing, table and JSON on synthetic data. No timing assertions."""

from __future__ import annotations

import json
import math
import random

import pytest

from bench.disagg.run import (
    MAX_MODEL_LEN,
    RequestResult,
    format_table,
    make_workload,
    parse_args,
    parse_connector_stats,
    parse_proxy_prefill,
    percentile,
    plot,
    summarize_rate,
    to_json,
)


# -- arguments ---------------------------------------------------------------


def test_defaults():
    a = parse_args([])
    assert a.configs == ["single", "single-1c", "1p1d"]
    assert a.rates == [0.5, 1.0, 2.0]
    assert a.single_1c_cpus == "0"
    assert a.single_cpus == "0-1" and a.prefill_cpus == "0" and a.decode_cpus == "1"
    assert a.long_words[1] + 1 + a.max_tokens <= MAX_MODEL_LEN
    assert a.out.endswith("out/disagg")


def test_parse_lists_and_ranges():
    a = parse_args(["--rates", "0.5, 2,4", "--configs", "1p1d", "--long-words", "100:200",
                    "--short-words", "8", "--out", "/tmp/x"])
    assert a.rates == [0.5, 2.0, 4.0]
    assert a.configs == ["1p1d"]
    assert a.long_words == (100, 200) and a.short_words == (8, 8)
    assert a.out == "/tmp/x"


@pytest.mark.parametrize("argv", [
    ["--rates", "0"], ["--rates", "-1"], ["--rates", "abc"], ["--rates", ""],
    ["--configs", "triple"], ["--long-words", "300:200"], ["--long-words", "x"],
    ["--long-fraction", "1.5"], ["--max-tokens", "1"],
    ["--long-words", "500:510"],  # does not fit max model length with the tokens
    ["--duration", "0"], ["--min-requests", "0"],
])
def test_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2


# -- workload ----------------------------------------------------------------


def test_workload_deterministic_mixed_poisson():
    w1 = make_workload(400, 2.0, 0.3, (40, 50), (5, 8), seed=3)
    w2 = make_workload(400, 2.0, 0.3, (40, 50), (5, 8), seed=3)
    assert [(r.at, r.kind, r.prompt) for r in w1] == [(r.at, r.kind, r.prompt) for r in w2]
    assert w1[0].at == 0.0
    assert all(b.at >= a.at for a, b in zip(w1, w1[1:]))
    longs = [r for r in w1 if r.kind == "long"]
    assert len(longs) == 120  # exactly round(n * fraction)
    assert all(40 <= len(r.prompt.split()) <= 50 for r in longs)
    assert all(5 <= len(r.prompt.split()) <= 8 for r in w1 if r.kind == "short")
    gaps = [b.at - a.at for a, b in zip(w1, w1[1:])]
    assert 0.4 < sum(gaps) / len(gaps) < 0.6  # mean inter-arrival ~ 1/rate
    other = make_workload(400, 2.0, 0.3, (40, 50), (5, 8), seed=4)
    assert {r.prompt for r in other}.isdisjoint({r.prompt for r in w1})  # no prefix-cache reuse across rates


# -- statistics --------------------------------------------------------------


def test_percentile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    rng = random.Random(1)
    for n in (1, 2, 3, 10, 101, 1000):
        xs = [rng.expovariate(1.0) for _ in range(n)]
        for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12, abs=1e-12)


def test_percentile_edges():
    assert math.isnan(percentile([], 50))
    assert percentile([7.0], 99) == 7.0
    assert percentile([3, 1, 2], 50) == 2
    assert percentile([0, 10], 99) == pytest.approx(9.9)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def _results():
    out = []
    for i in range(10):
        r = RequestResult(request_id=f"r{i}", kind="long" if i % 5 == 0 else "short", ok=True,
                          ttft=0.1 * (i + 1), itls=[0.02] * 9 + [0.5 if i == 0 else 0.02], tokens=11,
                          prefill_leg=0.05 * (i + 1))
        out.append(r)
    out.append(RequestResult(request_id="bad", kind="short", ok=False, error="HTTP 503: x"))
    return out


def test_summarize_rate():
    res = _results()
    conn = {"requests_loaded": 10, "load_s": 0.1, "bytes_loaded": 10 * 2**20, "load_failures": 0}
    row = summarize_rate("1p1d", 0.5, res, 30.0, conn)
    assert row["requests"] == 11 and row["ok"] == 10 and row["long"] == 2
    assert row["ttft_p50_ms"] == pytest.approx(550.0)
    assert row["ttft_p99_ms"] == pytest.approx(percentile([r.ttft for r in res[:10]], 99) * 1000, abs=0.1)
    assert row["itl_p50_ms"] == pytest.approx(20.0)
    assert row["itl_max_ms"] == pytest.approx(500.0)
    assert row["tokens"] == 110 and row["usage_tokens"] == 0
    assert row["errors"] == ["HTTP 503: x"]
    assert row["xfer_mean_ms"] == pytest.approx(10.0)
    assert row["xfer_MiBps"] == pytest.approx(100.0)
    assert row["xfer_share"] == pytest.approx(0.01 / 0.55, abs=1e-4)
    assert row["prefill_leg_share"] == pytest.approx(0.5)
    single = summarize_rate("single", 0.5, res[:10], 30.0)
    assert single["xfer_share"] is None and single["kv_requests_loaded"] is None


def test_summarize_all_failed():
    row = summarize_rate("single", 1.0, [RequestResult(request_id="x", kind="long", error="boom")], 1.0)
    assert row["ok"] == 0 and math.isnan(row["ttft_p99_ms"]) and math.isnan(row["itl_p99_ms"])
    assert "-" in format_table([row])
    json.loads(to_json({}, [row]))  # NaN becomes null: strict JSON


# -- log parsing -------------------------------------------------------------


def test_parse_connector_stats():
    log = "\n".join([
        "INFO 05-01 10:00:00 [loggers.py:123] Engine 000: Avg prompt throughput: 1.0 tokens/s",
        "(APIServer pid=1) INFO 05-01 10:00:02 [metrics.py:103] KV Transfer metrics: bytes_saved=0, "
        "requests_saved=0, save_s=0.0, bytes_loaded=1048576, requests_loaded=2, load_s=0.25, load_failures=0, "
        "save_failures=0, avg_load_ms=125.0, load_MiBps=4.0",
        "INFO KV Transfer metrics: bytes_loaded=2097152, requests_loaded=1, load_s=0.05, load_failures=1",
        "unrelated line load_s=99",
    ])
    s = parse_connector_stats(log)
    assert s["lines"] == 2
    assert s["bytes_loaded"] == 3 * 2**20 and s["requests_loaded"] == 3
    assert s["load_s"] == pytest.approx(0.30) and s["load_failures"] == 1
    assert "avg_load_ms" not in s
    assert parse_connector_stats("")["requests_loaded"] == 0


def test_parse_proxy_prefill():
    log = "\n".join([
        "2025-01-01 10:00:00,000 DEBUG kv_transfer.proxy: request disagg-abc: prefill http://127.0.0.1:1 "
        "0.812s, decode http://127.0.0.1:2 stream 1.500s",
        "2025-01-01 10:00:01,000 DEBUG kv_transfer.proxy: request r2: prefill http://h:1 0.050s, decode "
        "http://h:2 0.2s, status 200",
        "2025-01-01 10:00:01,000 INFO kv_transfer.proxy: policy round_robin",
    ])
    assert parse_proxy_prefill(log) == {"disagg-abc": pytest.approx(0.812), "r2": pytest.approx(0.05)}


# -- output ------------------------------------------------------------------


def _rows():
    res = _results()[:10]
    return [summarize_rate("single", 0.5, res, 20.0),
            summarize_rate("1p1d", 0.5, res, 20.0, {"requests_loaded": 10, "load_s": 0.1, "bytes_loaded": 1}),
            summarize_rate("single", 1.0, res, 10.0),
            summarize_rate("1p1d", 1.0, res, 10.0, {"requests_loaded": 0, "load_s": 0.0, "bytes_loaded": 0})]


def test_format_table():
    text = format_table(_rows())
    lines = text.splitlines()
    assert len(lines) == 2 + 4
    assert lines[0].split()[:2] == ["config", "req/s"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert all(len(ln) == len(lines[0]) for ln in lines)  # aligned
    assert lines[2].startswith("single") and lines[3].startswith("1p1d")
    assert "1.8%" in lines[3]  # xfer share 10 ms / 550 ms
    assert lines[2].rstrip().endswith("-")  # no transfer for the single instance


def test_json_roundtrip():
    rows = _rows()
    doc = json.loads(to_json({"command": "python -m bench.disagg", "cpus": {"single": "0-1"}}, rows))
    assert doc["meta"]["cpus"]["single"] == "0-1"
    assert [r["config"] for r in doc["rows"]] == ["single", "1p1d", "single", "1p1d"]
    assert doc["rows"][1]["xfer_mean_ms"] == pytest.approx(10.0)
    assert doc["rows"][3]["xfer_share"] is None


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "p.png"
    plot(_rows(), path, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
