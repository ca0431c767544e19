"""The attack run (bench/attack.py) against real listeners: every class of issue 15 stays closed,
and each target's RSS and open fds come back to their baseline after each attack.

The CI tier runs it briefly; the ``slow`` tier with the issue's numbers (1,000 short-lived
consumers per listener; the figures in docs/reliability.md come from that run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _attack_run(tmp_path, *args: str, timeout: float) -> dict:
    out = tmp_path / "attack.json"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("UCXKV_AUTH", None)
    p = subprocess.run([sys.executable, "-m", "bench.attack", "--json", str(out), *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert out.exists(), f"the attack run wrote no results (exit {p.returncode}):\n{p.stderr[-4000:]}"
    report = json.loads(out.read_text())
    failed = [r for r in report["results"] if not r["ok"]]
    assert not failed and p.returncode == 0, "\n".join(
        f"{r['target']} / {r['attack']}: {r['detail']}" for r in failed) + "\n" + p.stdout[-3000:]
    return report


def test_attack_run_brief(tmp_path):
    report = _attack_run(tmp_path, "--consumers", "12", "--flood-mib", "64", "--parked", "900",
                         "--big-tensors", "1", "--settle", "15", timeout=300)
    attacks = {(r["target"], r["attack"]) for r in report["results"]}
    assert ("pipe-listener-secret", "unterminated_multipart") in attacks
    assert ("pipe-listener", "parked_messages") in attacks and ("ucxkv-proxy", "proxy_bodies") in attacks
    assert len(attacks) == 14


@pytest.mark.slow
def test_attack_run_with_a_thousand_consumers(tmp_path):
    report = _attack_run(tmp_path, "--consumers", "1000", timeout=1800)
    consumers = [r for r in report["results"] if r["attack"] == "short_lived_consumers"]
    assert consumers and all("1000 consumers" in r["detail"] for r in consumers)
