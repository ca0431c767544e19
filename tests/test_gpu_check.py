"""`make gpu-check` (bench/gpu_check.py) without a GPU: the dry run, and the mechanics in host mode.

Nothing here is a GPU result: host mode runs the steps against host memory to prove
that time limits, failure recording and report writing work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import gpu_check as G

ROOT = G.ROOT
NO_GPU = G.detect_cuda() is None


def _run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(not NO_GPU, reason="this machine has a CUDA device: make gpu-check would run for real")
def test_make_gpu_check_without_cuda_ends_at_once(tmp_path):
    out = tmp_path / "report"
    p = _run(["make", "-s", "gpu-check", f"OUT={out}"], timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "no CUDA device" in p.stdout
    assert not out.exists()  # nothing installed, nothing written
    # so does the route for a machine without a registry: no wheel is looked at
    p = subprocess.run(["make", "-s", "gpu-check", f"OUT={out}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, PYTHONPATH=ROOT, GPU_WHEELS=str(out / "no-wheels")))
    assert p.returncode == 0 and "no CUDA device" in p.stdout, p.stdout + p.stderr
    assert not out.exists()
    # The driver itself says the same when called without the shell script.
    p = _run([sys.executable, "bench/gpu_check.py", "--out", str(out)], timeout=60)
    assert p.returncode == 0 and "no CUDA device" in p.stdout, p.stdout + p.stderr
    assert not out.exists()


def test_host_mode_records_a_timeout_and_goes_on(tmp_path):
    out = tmp_path / "r"
    p = _run([sys.executable, "bench/gpu_check.py", "--host-mode", "--quick", "--out", str(out),
              "--steps", "env,proto,copybw", "--timeout", "proto=1"], timeout=180)
    assert p.returncode == 1, p.stdout + p.stderr  # one step did not pass
    doc = json.loads((out / "gpu-check.json").read_text())
    steps = {s["name"]: s for s in doc["steps"]}
    assert doc["mode"].startswith("host")
    assert steps["proto"]["status"] == "timeout" and "1s time limit" in steps["proto"]["why"]
    assert steps["env.python"]["status"] == "ok" and steps["env.ucx_info-d"]["status"] == "ok"
    assert doc["results"]["ucx_build"]["version"]
    assert "tcp" in steps["env.ucx_info-d"]["details"]["transports"]
    assert steps["copybw"]["status"] == "ok"  # the step after the timeout still ran
    assert doc["results"]["copy"]["device"] == "cpu" and doc["results"]["copy"]["MB/s"] > 0
    md = (out / "gpu-check.md").read_text()
    assert md.startswith("> **HOST MODE") and "Nothing here is a GPU result" in md
    assert "| proto | timeout |" in md
    assert (out / "logs" / "proto.log").exists()


def test_host_mode_proto_and_perftest_report(tmp_path):
    """The proto step's verdict and UCX table rows, the perftest ratios, all parsed into the report."""
    out = tmp_path / "r"
    p = _run([sys.executable, "bench/gpu_check.py", "--host-mode", "--quick", "--out", str(out),
              "--steps", "proto,perftest", "--timeout", "perftest=90"], timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads((out / "gpu-check.json").read_text())["results"]
    assert r["proto"]["bit_exact"] is True and r["proto"]["bytes"] == 4 << 20
    assert r["proto"]["proto_lines"] and all("host memory" in ln for ln in r["proto"]["proto_lines"])
    cases = {c["case"]: c for c in r["perftest"]}
    kv = f"kv_bw {4 * 16 * 16 * 8 * 128 * 2 * 2}"
    fast = " (UCXKV_FAST_PATH_CUDA=1)"  # the same cases again with CUDA payloads on the compiled path
    plain = ["tensor_bw 1048576", "tensor_bw 4194304", f"{kv} layers"]
    assert set(cases) == {*plain, f"{kv} rma", *(c + fast for c in plain)}
    for c in cases.values():
        assert c["ucxkv_MBps"] > 0 and c["ucx_perftest_MBps"] > 0
        assert c["ucxkv_over_ucx_perftest"] == pytest.approx(c["ucxkv_MBps"] / c["ucx_perftest_MBps"])
    assert cases[f"{kv} layers"]["verified"] is True and cases[f"{kv} rma"]["verified"] is True


def test_cuda_mode_without_a_usable_gpu_fails_visibly(tmp_path, capsys):
    """The CUDA code path, run where torch sees no GPU: every step says so, none passes quietly."""
    args = G.build_parser().parse_args(["--out", str(tmp_path / "r"), "--no-install", "--python", sys.executable,
                                        "--steps", "env,tests,copybw"])
    args.gpu = "(test: CUDA code path with no usable GPU)"
    assert G.Check(args).run() == 1
    steps = {s["name"]: s for s in json.loads((tmp_path / "r" / "gpu-check.json").read_text())["steps"]}
    assert "install" not in steps and "install.requirements" not in steps
    assert steps["env.cuda"]["status"] == "failed" and "sees no CUDA device" in steps["env.cuda"]["why"]
    assert steps["tests"]["status"] == "failed" and "no GPU test passed" in steps["tests"]["why"]
    assert steps["tests"]["details"]["counts"]["skipped"] > 0
    assert steps["copybw"]["status"] == "failed" and steps["copybw"]["rc"] == 1
    assert "not passed: env.cuda, tests, copybw" in capsys.readouterr().out


def test_a_step_that_cannot_start_is_recorded(tmp_path):
    out = tmp_path / "r"
    p = _run([sys.executable, "bench/gpu_check.py", "--host-mode", "--out", str(out), "--steps", "copybw",
              "--python", str(tmp_path / "no-such-python")], timeout=60)
    assert p.returncode == 1
    (step,) = json.loads((out / "gpu-check.json").read_text())["steps"]
    assert step["status"] == "failed" and "cannot start" in step["why"]


def test_budget_spent_skips_the_rest(tmp_path):
    out = tmp_path / "r"
    p = _run([sys.executable, "bench/gpu_check.py", "--host-mode", "--out", str(out), "--steps", "env,copybw",
              "--budget", "1"], timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr  # skipped is not failed
    steps = json.loads((out / "gpu-check.json").read_text())["steps"]
    ran = [s for s in steps if s["status"] != "skipped"]
    assert not ran and any("budget" in s["why"] for s in steps)


UCX_INFO_D = """\
#      Memory domain: cuda_cpy
#     Component: cuda_cpy
#      Transport: cuda_copy
#         Device: cuda
#      Transport: cuda_ipc
#         Device: cuda
#      Transport: tcp
#         Device: lo
#         Device: eth0
"""


def test_parse_ucx_info_d():
    d = G.parse_ucx_info_d(UCX_INFO_D)
    assert d["transports"] == ["cuda_copy", "cuda_ipc", "tcp"]
    assert d["cuda_transports"] == ["cuda_copy", "cuda_ipc"]
    assert d["has"] == {"cuda_copy": True, "cuda_ipc": True, "gdr_copy": False}
    assert d["devices"] == ["cuda_copy/cuda", "cuda_ipc/cuda", "tcp/lo", "tcp/eth0"]


def test_parse_ucx_info_v():
    d = G.parse_ucx_info_v("# Library version: 1.21.0\n# Configured with: --prefix=/x --without-verbs "
                           "--with-cuda=/usr/local/cuda --enable-mt\n")
    assert d == {"version": "1.21.0", "configure": ["--without-verbs", "--with-cuda=/usr/local/cuda"]}


def test_parse_proto_picks_the_row_covering_the_size():
    text = "\n".join([
        "[1.0] [h:1 :0]   | ucp_context_0 intra-node cfg#1 | tagged message by ucp_tag_send* from cuda/GPU0 |",
        "[1.0] [h:1 :0]   |                        0..8191 | eager copy-in copy-out | cuda_copy/cuda |",
        "[1.0] [h:1 :0]   |                        8K..1M  | rendezvous zero-copy read | cuda_ipc/cuda |",
        "[1.0] [h:1 :0]   |                     1048577..inf | rendezvous pipeline | cuda_ipc/cuda |",
        json.dumps({"bytes": 64 << 20, "src": "cuda", "dst": "cuda", "bit_exact": True, "seconds": 0.01}),
    ])
    d = G.parse_proto(text)
    assert d["proto_lines"] == ["ucp_context_0 intra-node cfg#1: tagged message by ucp_tag_send* from cuda/GPU0 "
                                "| 1048577..inf | rendezvous pipeline | cuda_ipc/cuda"]
    assert d["carried_by_cuda_ipc"] is True
    assert G._in_range(8192, "8K..1M") and not G._in_range(8191, "8K..1M") and G._in_range(0, "0")
    assert not G._in_range(5, "n/a")


def test_parse_pytest_counts():
    d = G.parse_pytest("SKIPPED [2] tests/x.py:3: no CUDA\n5 passed, 2 skipped, 1 deselected in 3.1s\n")
    assert d["counts"] == {"passed": 5, "skipped": 2, "deselected": 1}
    assert d["short_summary"] == ["SKIPPED [2] tests/x.py:3: no CUDA"]
