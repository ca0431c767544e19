"""bench.progress_models: every ucxx progress model ping-pongs verified bytes, over tcp and shared memory."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from bench.progress_models import VARIANTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 50


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "bench.progress_models", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("tls", ["tcp", "sm"])
def test_every_variant_reports_verified_latency(tls: str) -> None:
    proc = _run("--tls", tls, "-n", str(N), "-w", "5", "--idle", "0.1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()
            if line.split() and line.split()[0] in VARIANTS}
    assert set(rows) == set(VARIANTS), out
    for name, cols in rows.items():
        assert "FAILED" not in cols, out
        tls_used, p50, avg, verified = cols[1], float(cols[2]), float(cols[3]), cols[5]
        assert tls_used == ("tcp" if tls == "tcp" else "posix,sysv,self"), (name, out)
        assert math.isfinite(p50) and p50 > 0 and math.isfinite(avg) and avg > 0, (name, out)
        assert verified == f"{N}/{N}", (name, out)  # every pong equalled its ping
        idle = [float(c) for c in cols[6:10]]
        assert all(math.isfinite(c) and c >= 0 for c in idle), (name, out)
        assert cols[10] == "MULTI", (name, out)  # what docs/bench.md says of ucxx workers


def test_unknown_variant_is_a_usage_error() -> None:
    proc = _run("--variants", "thread-poll,nope", "-n", "1", timeout=30)
    assert proc.returncode == 2
    assert "unknown variant(s) nope" in proc.stderr
