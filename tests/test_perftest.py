"""ucxkv-perftest: its outputs parse, its baseline runner works, kv_bw moves verified data.

Small sizes and few iterations; no timing assertions (the numbers are whatever
this machine gives). Every CLI run is a subprocess with ``--local``, so the
test process itself never touches UCX.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import _report as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run([sys.executable, "-m", "bench.perftest", "--local", "--tls", "tcp", "--no-progress", *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"rc={p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr[-3000:]}"
    return p


def test_sizes_parse() -> None:
    assert R.parse_sizes("4K:64K") == [4096, 8192, 16384, 32768, 65536]
    assert R.parse_sizes("8,1K,1M") == [8, 1024, 1 << 20]
    assert R.parse_sizes("1K:3K") == [1024, 2048, 3072]
    with pytest.raises(ValueError):
        R.parse_sizes("1Q")


def test_rows_format_roundtrip() -> None:
    res = R.compute_rows("tensor_bw", 1024, [0.001 * (i + 1) for i in range(10)])
    assert res.final is not None and res.final.iterations == 10
    line = R.format_row(res.final, "Final:")
    back = R.parse_table(line)[0]
    assert back.iterations == 10 and back.overall_bw_mbs == pytest.approx(res.final.overall_bw_mbs, abs=0.01)
    assert R.parse_csv(R.CSV_HEADER + "\n" + res.final.csv())[0].iterations == 10


def test_table_output_parses() -> None:
    p = _cli("-t", "tensor_bw", "-s", "1K,64K", "-n", "20", "-w", "2")
    rows = R.parse_table(p.stdout)
    assert [r.iterations for r in rows] == [20, 20]
    assert "|    Stage     | # iterations | 50.0%ile |" in p.stdout
    assert all(r.overall_bw_mbs > 0 for r in rows)


def test_csv_output_parses() -> None:
    p = _cli("-t", "tensor_lat", "-s", "8,4K", "-n", "30", "-w", "3", "-v")
    lines = p.stdout.strip().splitlines()
    assert lines[0] == R.CSV_HEADER
    rows = R.parse_csv(p.stdout)
    assert [r.iterations for r in rows] == [30, 30]


def test_json_output_with_pyzmq_baseline() -> None:
    p = _cli("-t", "tensor_bw", "-s", "4K:8K", "-n", "20", "-w", "2", "--json", "--baseline", "pyzmq,nixl")
    objs = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    assert [o["size"] for o in objs] == [4096, 8192]
    for o in objs:
        assert o["impl"] == "ucxkv" and o["iterations"] == 20 and o["test"] == "tensor_bw"
        assert o["baselines"]["pyzmq"]["iterations"] == 20
        assert "skipped" in o["baselines"]["nixl"]
        assert o["client_tls"] and o["server_tls"]


def test_rounds_alternate_ours_and_the_baselines_and_summarise_same_round_ratios() -> None:
    """--rounds 3: three of our runs, each followed by its baselines; the JSON keeps every round and the
    table ends with each baseline's min / median / max over the rounds, ratios paired within a round."""
    p = _cli("-t", "tensor_lat", "-s", "8", "-n", "50", "-w", "5", "--json", "--baseline", "pyzmq",
             "--rounds", "3", timeout=180)
    (o,) = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    assert len(o["rounds"]) == 3
    assert all(r["iterations"] == 50 and r["baselines"]["pyzmq"]["iterations"] == 50 for r in o["rounds"])
    assert o["overall_lat_us"] == o["rounds"][-1]["overall_lat_us"]  # the top level is the last round
    assert "Summary over 3 rounds" in p.stderr  # (the JSON keeps stdout to itself)
    t = _cli("-t", "tensor_bw", "-s", "64K", "-n", "40", "-w", "4", "--baseline", "pyzmq", "--rounds", "2",
             timeout=180)
    assert t.stdout.count("=== round") == 2 and len(R.parse_table(t.stdout)) == 2
    (line,) = [x for x in t.stdout.splitlines() if "pyzmq" in x and "ratio" in x and "rounds)" in x]
    assert "(2 rounds)" in line


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--pin needs two CPUs")
def test_pin_puts_our_server_and_client_on_the_two_cpus_asked() -> None:
    a, b = sorted(os.sched_getaffinity(0))[:2]
    p = _cli("-t", "tensor_lat", "-s", "8", "-n", "50", "-w", "5", "--json", "--baseline", "pyzmq,ucx_perftest",
             "--pin", f"{b},{a}")
    (o,) = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    assert o["server_cpus"] == [b] and o["client_cpus"] == [a]
    assert o["baselines"]["pyzmq"]["iterations"] == 50 and o["baselines"]["ucx_perftest"]["iterations"] == 50
    assert "-c" in o["baselines"]["ucx_perftest"]["command"].split()
    for bad in (f"{a},{a}", "0", "x,y", "0,99999"):
        env = dict(os.environ, PYTHONPATH=ROOT)
        q = subprocess.run([sys.executable, "-m", "bench.perftest", "--local", "--pin", bad], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
        assert q.returncode == 2 and "--pin wants" in q.stderr


def test_round_ratios_pair_each_round_with_its_own_baseline() -> None:
    def res(impl: str, bw: float, lat: float) -> R.Result:
        return R.Result(test="tensor_bw", size=8, impl=impl, final=R.Row(10, lat, lat, lat, bw, bw, 1.0, 1.0))

    rounds = [([res("ucxkv", 100.0, 2.0)], {"b": {8: res("b", 50.0, 4.0)}, "skip": {8: "skipped: why"}}),
              ([res("ucxkv", 30.0, 8.0)], {"b": {8: res("b", 60.0, 2.0)}, "skip": {8: "skipped: why"}})]
    assert R.round_ratios(rounds, False) == {8: {"b": [(100.0, 50.0, 2.0), (30.0, 60.0, 0.5)]}}
    assert R.round_ratios(rounds, True) == {8: {"b": [(2.0, 4.0, 2.0), (8.0, 2.0, 0.25)]}}


def test_ucx_perftest_baseline_runner() -> None:
    from bench import _baselines as B

    env = dict(os.environ, UCX_TLS="tcp", UCX_RNDV_THRESH="8192", UCX_MAX_RNDV_RAILS="1", UCX_MEMTYPE_CACHE="n")
    res = B.run_ucx_perftest("tag_bw", 16384, 50, 5, env, timeout_s=60)
    assert res.final is not None and res.final.iterations == 50 and res.final.overall_bw_mbs > 0
    lat = B.run_ucx_perftest("tag_lat", 8, 100, 10, env, timeout_s=60)
    assert lat.final is not None and lat.final.iterations == 100


def test_ucx_perftest_baseline_uses_our_transports_and_shows_the_asked_ones() -> None:
    """Asked for sm, our processes run posix,sysv,self (no cma): the ucx_perftest baseline runs
    with those same transports and our window, and a second, labelled one with sm as asked."""
    p = _cli("-t", "tensor_bw", "-s", "64K", "-n", "50", "-w", "5", "--tls", "sm", "--json",
             "--baseline", "ucx_perftest")
    (o,) = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    assert o["client_tls"] == o["server_tls"] == "posix,sysv,self"
    same, asked = o["baselines"]["ucx_perftest"], o["baselines"]["ucx_perftest(sm)"]
    assert same["tls"] == "UCX_TLS=posix,sysv,self" and asked["tls"] == "UCX_TLS=sm"
    for b in (same, asked):
        assert b["iterations"] == 50 and b["overall_bw_mbs"] > 0 and " -O 8" in b["command"]


def test_ucx_perftest_runs_one_baseline_when_our_transports_are_the_asked_ones() -> None:
    from bench.perftest import ucx_perftest_runs

    env = {"UCX_TLS": "tcp"}
    assert ucx_perftest_runs(env, {"client_tls": "tcp", "server_tls": "tcp"}) == [("ucx_perftest", env)]
    runs = ucx_perftest_runs({"UCX_TLS": "sm"}, {"client_tls": "posix,sysv,self", "server_tls": "posix,sysv,self"})
    assert [(n, e["UCX_TLS"]) for n, e in runs] == [("ucx_perftest", "posix,sysv,self"), ("ucx_perftest(sm)", "sm")]


@pytest.mark.parametrize("layout,mode", [("vllm_cpu", "gather"), ("flash_attn", "views"), ("flash_attn", "rma"),
                                         ("vllm_cpu", "rma"), ("vllm_cpu", "gather --verify"),
                                         ("flash_attn", "layers --verify")])
def test_kv_bw_local_moves_verified_data(layout: str, mode: str) -> None:
    mode, *flags = mode.split()
    p = _cli("-t", "kv_bw", "--layers", "3", "--kv-heads", "2", "--head-size", "16", "--block-size", "4",
             "--tokens", "60", "--layout", layout, "--kv-mode", mode, "-n", "2", "-w", "1", "--json", *flags)
    (obj,) = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    assert obj["verified"] is True and obj["bad_layers"] == []
    assert obj["verify"] is bool(flags)  # --verify: checksums computed, sent and checked every iteration
    assert obj["blocks"] == 15 and obj["iterations"] == 2
    assert obj["size"] == 3 * 15 * 4 * 2 * 16 * 2 * 2  # layers*blocks*block*heads*head*K,V*bf16


def test_lookup_lat_round_trips_through_a_served_lookup_buffer() -> None:
    p = _cli("-t", "lookup_lat", "-s", "8,64K", "-n", "30", "-w", "3", "--json")
    lines = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    assert [d["size"] for d in lines] == [8, 65536]
    for d in lines:
        assert d["test"] == "lookup_lat" and d["iterations"] == 30
        assert d["lookup_wrong_answers"] == 0 and d["served"] == 33 and d["errors"] == []
    # the server process has two threads asleep on one worker; when a wake-up was lost (one
    # shared kick eventfd), the 8 B median was a sleeper's 50 ms tick (51 ms; ~2 ms since)
    assert lines[0]["p50_lat_us"] < 25_000, lines[0]["p50_lat_us"]


def test_msg_cost_reports_per_call_cpu_of_send_and_receive() -> None:
    import re

    res = subprocess.run([sys.executable, "-m", "bench.msg_cost", "-n", "200", "-r", "2", "--tls", "sm"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r"send_tensor ([\d.]+) us CPU, recv_tensor\(out=\) ([\d.]+) us CPU", res.stdout)
    assert m, res.stdout
    assert 0 < float(m.group(1)) < 10_000 and 0 < float(m.group(2)) < 10_000


def test_lookup_profile_reports_both_sides_of_a_round_trip() -> None:
    import re

    res = subprocess.run([sys.executable, "-m", "bench.lookup_profile", "-n", "400", "-m", "300", "--profile"],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    assert re.search(r"\n  answer send_message/recv_message +[\d.]+ / +[\d.]+ us", res.stdout), res.stdout
    assert re.search(r"echo answer send_message/recv_message +[\d.]+ / +[\d.]+ us", res.stdout), res.stdout
    m = re.search(r"round trip \(200 lookups\): p50 ([\d.]+) us.*client ([\d.]+) us, server handler ([\d.]+) us",
                  res.stdout)
    assert m and all(0 < float(v) < 1e6 for v in m.groups()), res.stdout
    assert res.stdout.count("function calls per lookup") == 2, res.stdout


def test_lookup_profile_with_several_consumers_reports_server_cost_per_lookup() -> None:
    import re

    res = subprocess.run([sys.executable, "-m", "bench.lookup_profile", "-n", "300", "--consumers", "2",
                          "--pace-us", "500"], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r"2 consumers x 100 timed lookups.*server CPU ([\d.]+) us and ([\d.]+) wake-ups per lookup "
                  r"\(engine's count ([\d.]+)", res.stdout)
    assert m, res.stdout
    cpu, wakes, engine_wakes = (float(v) for v in m.groups())
    assert 0 < cpu < 1e5 and 0 <= engine_wakes <= wakes, res.stdout


def test_stream_cost_reports_cpu_per_message_thread_by_thread() -> None:
    import re

    res = subprocess.run([sys.executable, "-m", "bench.stream_cost", "--size", "65536", "-n", "400", "--tls", "sm"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    for side in ("receiver", "sender"):
        m = re.search(side + r": ([\d.]+) us CPU/message, (\d+) MB/s\n  " + side + r" threads: (.*)", res.stdout)
        assert m and 0 < float(m.group(1)) < 1e5 and int(m.group(2)) > 0, res.stdout
        threads = dict(re.findall(r"(\S+) ([\d.]+) us, [\d.]+\+[\d.]+ cs", m.group(3)))
        assert float(threads["MainThread"]) > 0, m.group(3)  # the thread that sends or receives
        # the same CPU counted two ways (schedstat vs getrusage's tick-scaled split): roughly equal
        total = float(m.group(1))
        assert 0.5 * total - 5 <= sum(map(float, threads.values())) <= 1.5 * total + 5, (threads, total)


def test_stream_cost_with_gaps_sends_everything_without_a_waiter() -> None:
    import re

    res = subprocess.run([sys.executable, "-m", "bench.stream_cost", "--size", "1048576", "-n", "20", "--gap-us", "500",
                          "--tls", "sm"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    for side in ("receiver", "sender"):
        m = re.search(side + r": ([\d.]+) us CPU/message, (\d+) MB/s", res.stdout)
        assert m and int(m.group(2)) > 0, res.stdout


@pytest.mark.parametrize("send,recv", [("c", "c"), ("pipe", "c"), ("c", "pipe")])
def test_c_stream_moves_every_tensor_with_python_out_of_either_side(send: str, recv: str) -> None:
    """The probe's C loops speak the pipe's wire: a C sender to a Pipe receiver and back, and C to C."""
    import re

    res = subprocess.run([sys.executable, "-m", "bench.c_stream", "--size", "65536", "-n", "200", "--send", send,
                          "--recv", recv], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(rf"sender \({send}\): ([\d.]+) us CPU/message; stream (\d+) MB/s", res.stdout)
    assert m and int(m.group(2)) > 0, res.stdout
    assert re.search(rf"receiver \({recv}\): [\d.]+ us CPU/message", res.stdout), res.stdout


def test_cold_code_times_the_same_python_warm_and_after_other_work() -> None:
    import re

    res = subprocess.run([sys.executable, "-m", "bench.cold_code", "-n", "100"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = dict(re.findall(r"^(\S.*?) +([\d.]+) us per call \(median of 100\)$", res.stdout, re.M))
    assert set(rows) == {"back to back", "after a 50 us Python busy loop", "after usleep(50)",
                         "after memset of 2 MiB", "after memset of 8 MiB"}, res.stdout
    assert all(0 < float(v) < 1e5 for v in rows.values()), rows


def test_kv_mode_stage_and_auto_resolve_like_the_connector(monkeypatch, capsys) -> None:
    import argparse

    from bench.perftest import _resolve_kv_mode
    from kv_transfer._kv_mode import auto_kv_mode

    args = argparse.Namespace(kv_mode="stage")
    _resolve_kv_mode(args)
    assert args.kv_mode == "gather"  # the connector's staging path is the bench's gather mode
    for tls in ("tcp", "sm", ""):
        monkeypatch.setenv("UCX_TLS", tls)
        args = argparse.Namespace(kv_mode="auto")
        _resolve_kv_mode(args)
        want = {"stage": "gather"}.get(auto_kv_mode(tls)[0], auto_kv_mode(tls)[0])
        assert args.kv_mode == want
        assert f"UCX_TLS={tls or '(unset)'} ->" in capsys.readouterr().err  # the choice and its reason
