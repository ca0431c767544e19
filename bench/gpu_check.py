"""``make gpu-check OUT=DIR``: the whole GPU truth of ucxkv in one short run.

Run from a fresh checkout on a machine with an NVIDIA GPU (``scripts/gpu_check.sh``
calls this file with the system ``python3``; everything at module level is the
standard library). Without a CUDA device it prints ``no CUDA device`` and exits 0
before installing anything, so CI can call it as a dry run.

On a CUDA machine it:

0. installs ``requirements-gpu.txt`` (pinned: torch's CUDA 12 build, ``ucxx-cu12``
   with ``libucx-cu12``, cupy) and the project (``pip install -e . --no-deps``)
   into ``.venv-gpu`` inside the checkout, pip's cache in ``.gpu-cache/``; each
   install step is timed. A venv whose stamp matches the requirements is reused.
1. ``env``: ``nvidia-smi``, ``ucx_info -v`` / ``-d`` (which CUDA transports UCX
   sees: ``cuda_copy``, ``cuda_ipc``, ``gdr_copy``), torch / CUDA / driver versions;
2. ``tests``: ``pytest -m gpu`` over the test files that carry the ``gpu`` marker;
3. ``proto``: a 64 MiB CUDA->CUDA ``send_tensor`` between two processes under
   ``UCX_PROTO_INFO=y``; the protocol lines UCX printed go into the report;
4. ``copybw``: device-to-device ``torch`` copy bandwidth (the physical reference);
5. ``perftest``: ``ucxkv-perftest --local -m cuda,cuda`` ``tensor_bw`` at 1 MiB and
   256 MiB and ``kv_bw`` (Llama-3-8B shape, flash-attn layout; layers and rma modes), each beside
   ``ucx_perftest -m cuda,cuda`` with the same UCX settings; median of ``--runs``;
   ``tensor_bw`` and ``kv_bw`` layers also run with ``UCXKV_FAST_PATH_CUDA=1`` (CUDA payloads
   through the compiled path), each right after the same case without it;
6. ``profile``: the sender of a 1 MiB ``tensor_bw`` under cProfile (``UCXKV_FAST_PATH_CUDA=1``),
   the top of its own-time listing in the report (where a device message's time goes).

Every step runs in its own process group under its own time limit, all of them
inside an overall budget (``--budget``, default 480 s). A step that fails or
times out is recorded with why, and the run goes on. The report is written to
``OUT/gpu-check.md`` and ``OUT/gpu-check.json`` (plus the full output of each
step in ``OUT/logs/``). Exit status: 0 when every step passed or there is no CUDA
device, 1 otherwise.

``--host-mode`` (``GPU_CHECK_FORCE=1`` in the shell script) runs the same steps
against host memory with the current interpreter and installs nothing: it
proves the mechanics (subprocesses, time limits, failure recording, report
writing) on a machine without a GPU. Its numbers are host numbers, and the
report says so in its first line; it is never a GPU result.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv-gpu")
CACHE = os.path.join(ROOT, ".gpu-cache")
REQUIREMENTS = os.path.join(ROOT, "requirements-gpu.txt")
#: Installed on its own, so that a cupy problem costs only the cupy test case.
REQUIREMENTS_CUPY = os.path.join(ROOT, "requirements-gpu-cupy.txt")
STAMP = os.path.join(VENV, ".gpu-check-installed")
NO_CUDA = "no CUDA device"
EXCERPT_CHARS = 2500
MIB = 1 << 20

#: Per-step time limits in seconds (each also capped by what is left of --budget).
TIMEOUTS = {
    "install.venv": 60, "install.requirements": 300, "install.project": 90, "install.verify": 60,
    "env": 60, "tests": 240, "proto": 60, "copybw": 45, "perftest": 100, "profile": 60,
}
STEPS = ("env", "tests", "proto", "copybw", "perftest", "profile")
#: Lines of the sender's profile kept in the report (the listing is in the step's log).
PROFILE_LINES = 30


# --------------------------------------------------------------------------- detection
def detect_cuda() -> str | None:
    """A one-line description of the NVIDIA GPU here, or None when there is none.

    Looks at ``nvidia-smi -L`` (20 s limit) and ``/dev/nvidia[0-9]*``; imports nothing.
    """
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            p = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("GPU ")]
            if p.returncode == 0 and lines:
                return "; ".join(lines)
        except (OSError, subprocess.TimeoutExpired):
            pass
    nodes = sorted(glob.glob("/dev/nvidia[0-9]*"))
    if nodes:
        return f"{len(nodes)} device node(s) {', '.join(nodes)} (nvidia-smi {'failed' if smi else 'missing'})"
    return None


# --------------------------------------------------------------------------- running steps
def run_cmd(cmd: list[str], timeout: float, env: dict[str, str] | None = None,
            log_path: str | None = None) -> tuple[int | None, str, float]:
    """Run ``cmd`` in its own process group; returns (rc or None on timeout, output, seconds).

    On timeout the whole group (servers it started included) is killed. A command
    that cannot start returns rc 127 with the reason as its output.
    """
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, errors="replace", start_new_session=True)
    except OSError as exc:
        return 127, f"cannot start {cmd[0]}: {exc}", time.monotonic() - t0
    rc: int | None
    try:
        out, _ = proc.communicate(timeout=max(timeout, 0.1))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            out = ""
        out = (out or "") + f"\n[gpu-check: killed after {timeout:.0f}s time limit]"
        rc = None
    if log_path:
        with open(log_path, "w") as f:
            f.write(f"$ {' '.join(cmd)}\n{out}")
    return rc, out or "", time.monotonic() - t0


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _tail(text: str, n: int = EXCERPT_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= n else "...\n" + text[-n:]


class Check:
    """One gpu-check run: the steps done so far, the budget left, the report."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.host_mode: bool = args.host_mode
        self.mem = "host" if self.host_mode else "cuda"
        self.device = "cpu" if self.host_mode else "cuda"
        self.out = os.path.abspath(args.out)
        self.logs = os.path.join(self.out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget
        self.steps: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}
        self.python = args.python or (sys.executable if self.host_mode else os.path.join(VENV, "bin", "python"))
        self.timeouts = dict(TIMEOUTS)
        for item in args.timeout:
            name, _, sec = item.partition("=")
            self.timeouts[name] = float(sec)
        self.quick = args.quick

    # -- environment for every child ----------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PIP_CACHE_DIR"] = os.path.join(CACHE, "pip")
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        env["UCX_WARN_UNUSED_ENV_VARS"] = "n"
        env.update(extra)
        return env

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def step(self, name: str, cmd: list[str], env: dict[str, str] | None = None,
             parse: Callable[[str], dict[str, Any]] | None = None, ok_rc: tuple[int, ...] = (0,),
             verdict: Callable[[dict[str, Any]], str | None] | None = None) -> dict[str, Any]:
        """Run one step under min(its limit, budget left) and record it; never raises.

        ``parse`` turns the output into ``details``; ``verdict`` (given those details)
        returns why a step that exited 0 still failed, or None.
        """
        own = self.timeouts.get(name, self.timeouts.get(name.split(".")[0], 60))
        limit = min(own, self.left())
        rec: dict[str, Any] = {"name": name, "command": " ".join(cmd), "limit_s": round(max(limit, 0), 1)}
        if self.left() < 3:
            rec.update(status="skipped", duration_s=0.0, why=f"budget of {self.args.budget:.0f}s spent", excerpt="")
            self._add(rec)
            return rec
        log_path = os.path.join(self.logs, name.replace("/", "_") + ".log")
        rc, out, dur = run_cmd(cmd, limit, env or self.env(), log_path)
        rec.update(rc=rc, duration_s=round(dur, 2), excerpt=_tail(out), log=os.path.relpath(log_path, self.out))
        if rc is None:
            rec.update(status="timeout", why=f"no result within its {limit:.0f}s time limit")
        elif rc not in ok_rc:
            rec.update(status="failed", why=f"exit status {rc}: {_last_error(out)}")
        else:
            rec["status"] = "ok"
        if parse is not None:
            try:
                rec["details"] = parse(out)
            except Exception as exc:  # noqa: BLE001 - a parse problem is recorded, the run goes on
                rec["details"] = {"parse_error": f"{type(exc).__name__}: {exc}"}
                if rec["status"] == "ok":
                    rec.update(status="failed", why=f"output not understood: {exc}")
        if verdict is not None and rec["status"] == "ok":
            why = verdict(rec.get("details") or {})
            if why:
                rec.update(status="failed", why=why)
        self._add(rec)
        return rec

    def record(self, name: str, status: str, why: str = "", **details: Any) -> None:
        rec = {"name": name, "status": status, "duration_s": 0.0, "why": why, "excerpt": "", "details": details}
        self._add(rec)

    def _add(self, rec: dict[str, Any]) -> None:
        self.steps.append(rec)
        why = f" ({rec['why']})" if rec.get("why") else ""
        print(f"gpu-check: {rec['name']:<22} {rec['status']:<8} {rec['duration_s']:7.1f}s{why}", flush=True)
        self.write_report()  # after every step: a run killed from outside still leaves its report

    # -- install ---------------------------------------------------------------
    def install(self) -> bool:
        """Steps install.*; True when the venv's torch is a CUDA build."""
        h = hashlib.sha256()
        for path in (REQUIREMENTS, REQUIREMENTS_CUPY):
            with open(path, "rb") as f:
                h.update(f.read())
        want = h.hexdigest()
        if _read(STAMP) == want and os.access(self.python, os.X_OK):
            self.record("install", "ok", why="reused .venv-gpu (stamp matches requirements-gpu.txt)")
            return True
        base = self.args.base_python
        if not os.access(os.path.join(VENV, "bin", "python"), os.X_OK):
            rec = self.step("install.venv", [base, "-m", "venv", VENV])
            if rec["status"] != "ok":  # no ensurepip (Debian without python3-venv): virtualenv from PyPI
                target = os.path.join(CACHE, "virtualenv")
                self.step("install.virtualenv", [base, "-m", "pip", "install", "-q", "--target", target,
                                                 "virtualenv==20.29.3"])
                alt = self.step("install.venv-virtualenv", [
                    base, "-c", f"import sys; sys.path.insert(0, {target!r}); "
                    f"import virtualenv; sys.exit(virtualenv.cli_run([{VENV!r}]) is None)"])
                if alt["status"] != "ok":
                    return False
                rec.update(status="skipped", why=f"{rec['why']}; virtualenv made .venv-gpu instead")
                self.write_report()
        pip = [self.python, "-m", "pip", "install", "--progress-bar", "off", "--disable-pip-version-check"]
        req = self.step("install.requirements", pip + ["--only-binary", ":all:", "-r", REQUIREMENTS])
        cupy = self.step("install.cupy", pip + ["--only-binary", ":all:", "-r", REQUIREMENTS_CUPY])
        self.step("install.project", pip + ["--no-deps", "-e", ROOT])
        ver = self.step("install.verify", [self.python, "-c", (
            "import torch, ucxx, zmq, msgspec, transport, kv_transfer; "
            "assert torch.version.cuda, 'torch %s is a CPU-only build' % torch.__version__; "
            "print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())")])
        if req["status"] == cupy["status"] == ver["status"] == "ok":
            with open(STAMP, "w") as f:
                f.write(want + "\n")
        return ver["status"] == "ok"

    # -- steps -----------------------------------------------------------------
    def run_env(self) -> None:
        if shutil.which("nvidia-smi"):
            self.step("env.nvidia-smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,pci.bus_id",
                                         "--format=csv,noheader"], parse=lambda o: {"gpus": o.strip().splitlines()})
        else:
            self.record("env.nvidia-smi", "skipped", why="nvidia-smi not on PATH")
        code = ("import json, os, platform, torch, libucx, ucxx; "
                "d = {'python': platform.python_version(), 'torch': torch.__version__, 'torch_cuda': torch.version.cuda, "
                "'cuda_available': torch.cuda.is_available(), 'ucxx': ucxx.__version__, "
                "'libucx_dir': os.path.dirname(libucx.__file__)}\n"
                "if torch.cuda.is_available():\n"
                "    d['device'] = torch.cuda.get_device_name(0)\n"
                "    try:\n        d['cuda_driver_api'] = torch._C._cuda_getDriverVersion()\n"
                "    except Exception as e:\n        d['cuda_driver_api'] = f'unknown: {e}'\n"
                "    d['capability'] = list(torch.cuda.get_device_capability(0))\n"
                "try:\n    import cupy; d['cupy'] = cupy.__version__\nexcept Exception as e:\n    d['cupy'] = f'not usable: {e}'\n"
                # whether the compiled per-message path builds here (it needs a C compiler and Python.h)
                "try:\n    from transport import _ucp_tag; d['compiled_path'] = _ucp_tag.lib() is not None\n"
                "except Exception as e:\n    d['compiled_path'] = f'not usable: {e}'\n"
                "print(json.dumps(d))")
        rec = self.step("env.python", [self.python, "-c", code], parse=_last_json)
        self.results["versions"] = rec.get("details")
        if not self.host_mode and rec["status"] == "ok" and not rec["details"].get("cuda_available"):
            self.record("env.cuda", "failed", why=f"torch {rec['details'].get('torch')} sees no CUDA device "
                        "(driver too old for CUDA 12.8, or no device in this container?)")
        self.step("env.pip-freeze", [self.python, "-m", "pip", "freeze", "--all"])
        libucx_dir = (rec.get("details") or {}).get("libucx_dir")
        if not libucx_dir:
            self.record("env.ucx_info", "skipped", why="libucx not importable (see env.python)")
            return
        ucx_info = os.path.join(libucx_dir, "bin", "ucx_info")
        lib = os.path.join(libucx_dir, "lib")
        env = self.env(LD_LIBRARY_PATH=lib + os.pathsep + os.environ.get("LD_LIBRARY_PATH", ""))
        rec = self.step("env.ucx_info-v", [ucx_info, "-v"], env=env, parse=parse_ucx_info_v)
        self.results["ucx_build"] = rec.get("details")
        rec = self.step("env.ucx_info-d", [ucx_info, "-d"], env=env, parse=parse_ucx_info_d)
        self.results["ucx_transports"] = (rec.get("details") or {})

    def run_tests(self) -> None:
        files = gpu_test_files()
        if not files:
            self.record("tests", "failed", why="no test file carries pytest.mark.gpu")
            return

        def none_passed(d: dict[str, Any]) -> str | None:
            counts = d.get("counts", {})
            if self.host_mode or counts.get("passed"):
                return None
            return f"no GPU test passed ({counts}): they all skipped"

        rec = self.step("tests", [self.python, "-m", "pytest", "-m", "gpu", "-q", "-ra", "-p", "no:cacheprovider",
                                  *files], parse=parse_pytest, verdict=none_passed)
        self.results["tests"] = rec.get("details")

    def run_proto(self) -> None:
        size = "4M" if self.quick else "64M"
        rec = self.step("proto", [self.python, "-m", "bench.gpu_check", "proto", "--mem", self.device,
                                  "--size", size], env=self.env(UCX_PROTO_INFO="y"), parse=parse_proto)
        self.results["proto"] = rec.get("details")

    def run_copybw(self) -> None:
        size = "16M" if self.quick else "256M"
        rec = self.step("copybw", [self.python, "-m", "bench.gpu_check", "copybw", "--device", self.device,
                                   "--size", size], parse=_last_json)
        self.results["copy"] = rec.get("details")

    def run_perftest(self) -> None:
        perftest = os.path.join(os.path.dirname(self.python), "ucxkv-perftest")
        base = [perftest] if os.access(perftest, os.X_OK) else [self.python, "-m", "bench.perftest"]
        mem = f"{self.mem},{self.mem}"
        common = ["--local", "-m", mem, "--json", "--no-progress", "--baseline", "ucx_perftest", "--timeout", "60"]
        tensor = ["-t", "tensor_bw", "-s", "1M,4M" if self.quick else "1M,256M"]
        kv = ["-t", "kv_bw", "--layout", "flash_attn"] + (["--layers", "4", "--tokens", "256"] if self.quick else [])
        # rma: decode GETs the blocks in place from prefill's registered cache (cuda_ipc on one GPU)
        kv_rma = kv + ["--kv-mode", "rma"]
        runs: dict[str, list[dict[str, Any]]] = {}
        n = 1 if self.quick else self.args.runs
        failed_first: set[str] = set()
        # each case beside the same case with CUDA payloads on the compiled path (UCXKV_FAST_PATH_CUDA=1,
        # off by default until it is measured and checked here), in adjacent steps
        fast = {"UCXKV_FAST_PATH_CUDA": "1"}
        cases = (("tensor_bw", tensor, {}), ("tensor_bw_cfast", tensor, fast), ("kv_bw", kv, {}),
                 ("kv_bw_cfast", kv, fast), ("kv_bw_rma", kv_rma, {}))
        for i in range(n):
            for label, extra, env in cases:
                name = f"perftest.{label}.{i + 1}"
                if label in failed_first:  # the same failure again would only spend the budget
                    self.record(name, "skipped", why=f"perftest.{label}.1 failed")
                    continue
                rec = self.step(name, base + extra + common, env=self.env(**env), parse=parse_perftest_json)
                if i == 0 and rec["status"] != "ok":
                    failed_first.add(label)
                for row in (rec.get("details") or {}).get("rows", []):
                    mode = f" {row['kv_mode']}" if row.get("kv_mode") else ""
                    tag = " (UCXKV_FAST_PATH_CUDA=1)" if env else ""
                    runs.setdefault(f"{row['test']} {row['size']}{mode}{tag}", []).append(row)
        self.results["perftest"] = summarise_perftest(runs, (self.results.get("copy") or {}).get("MB/s"))

    def run_profile(self) -> None:
        """Where the sender's time goes in a 1 MiB device-to-device ``tensor_bw`` (cProfile, by own time)."""
        mem = f"{self.mem},{self.mem}"
        n = "200" if self.quick else "20000"  # the messages, not the imports, on top of the listing
        # with CUDA payloads on the compiled path: what is left of a device message's time there
        rec = self.step("profile", [self.python, "-m", "cProfile", "-s", "tottime", "-m", "bench.perftest",
                                    "-t", "tensor_bw", "-s", "1M", "-n", n, "--local", "-m", mem, "--no-progress"],
                        env=self.env(UCXKV_FAST_PATH_CUDA="1"), parse=parse_profile)
        self.results["profile"] = rec.get("details")

    # -- the whole run -----------------------------------------------------------
    def run(self) -> int:
        wanted = self.args.steps.split(",") if self.args.steps else list(STEPS)
        unknown = set(wanted) - set(STEPS)
        if unknown:
            raise SystemExit(f"gpu-check: unknown step(s) {sorted(unknown)}; choose from {', '.join(STEPS)}")
        ready = True
        if not self.host_mode and not self.args.no_install:
            ready = self.install()
        for name in STEPS:
            if name not in wanted:
                continue
            if not ready:
                self.record(name, "skipped", why="install failed (see install.* steps)")
                continue
            getattr(self, f"run_{name}")()
        self.write_report()
        bad = [s["name"] for s in self.steps if s["status"] not in ("ok", "skipped")]
        print(f"gpu-check: report in {os.path.join(self.out, 'gpu-check.md')}; "
              f"{'all steps passed' if not bad else 'not passed: ' + ', '.join(bad)}", flush=True)
        return 1 if bad or not ready else 0

    def write_report(self) -> None:
        doc = {
            "mode": "host (no GPU result)" if self.host_mode else "cuda",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "host": platform.node(), "cpus": os.cpu_count(), "gpu": self.args.gpu,
            "git": _git_head(), "budget_s": self.args.budget,
            "total_s": round(time.monotonic() - self.t0, 1),
            "install_s": round(sum(s["duration_s"] for s in self.steps if s["name"].startswith("install")), 1),
            "steps": self.steps, "results": self.results,
        }
        with open(os.path.join(self.out, "gpu-check.json"), "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
        with open(os.path.join(self.out, "gpu-check.md"), "w") as f:
            f.write(render_markdown(doc))


# --------------------------------------------------------------------------- parsers
def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _last_error(out: str) -> str:
    lines = [ln.strip() for ln in out.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"error|Error|ERROR|FAILED|assert|killed", ln):
            return ln[:300]
    return (lines[-1][:300] if lines else "no output")


def parse_profile(out: str) -> dict[str, Any]:
    """The header and first ``PROFILE_LINES`` rows of a ``cProfile -s tottime`` listing."""
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if "function calls" in ln)
    return {"top": [ln for ln in lines[start:start + 6 + PROFILE_LINES] if ln.strip()]}


def _last_json(out: str) -> dict[str, Any]:
    for ln in reversed(out.splitlines()):
        if ln.startswith("{"):
            return json.loads(ln)
    raise ValueError("no JSON line in the output")


def parse_ucx_info_v(out: str) -> dict[str, Any]:
    """UCX's version and the configure flags that decide GPU and RDMA support."""
    version = re.search(r"Library version:\s*(\S+)", out)
    flags = re.findall(r"--(?:with|without|enable|disable)-(?:cuda|gdrcopy|verbs|rdmacm|mlx5-dv|rocm)\S*", out)
    return {"version": version.group(1) if version else None, "configure": flags}


def parse_ucx_info_d(out: str) -> dict[str, Any]:
    """Transports and devices ``ucx_info -d`` lists, and which of them are CUDA ones."""
    pairs: list[tuple[str, str]] = []
    tl = None
    for ln in out.splitlines():
        m = re.match(r"#\s+Transport:\s+(\S+)", ln)
        if m:
            tl = m.group(1)
            continue
        m = re.match(r"#\s+Device:\s+(\S+)", ln)
        if m and tl:
            pairs.append((tl, m.group(1)))
    transports = sorted({t for t, _ in pairs})
    cuda = [t for t in transports if t.startswith(("cuda", "gdr"))]
    return {"transports": transports, "devices": [f"{t}/{d}" for t, d in pairs], "cuda_transports": cuda,
            "has": {t: t in transports for t in ("cuda_copy", "cuda_ipc", "gdr_copy")}}


def parse_pytest(out: str) -> dict[str, Any]:
    """Counts from pytest's closing line, and the ``-ra`` reasons."""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)",
                                                 out.strip().splitlines()[-1] if out.strip() else "")}
    reasons = [ln for ln in out.splitlines() if re.match(r"(SKIPPED|FAILED|ERROR) ", ln)]
    return {"counts": counts, "short_summary": reasons[:40]}


def parse_proto(out: str) -> dict[str, Any]:
    """The bit-exact verdict, and per UCX_PROTO_INFO table the row that covers the message size.

    UCX prints one table per (context, operation, memory type): a header row
    ``| ucp_context_0 intra-node cfg#0 | tagged message by ucp_tag_send* from cuda/GPU0 |``
    then rows ``| 16353..inf | rendezvous zero-copy ... | cuda_ipc/cuda0 |``.
    """
    res = _last_json(out)
    size = res["bytes"]
    chosen: list[str] = []
    header = ""
    for ln in out.splitlines():
        cells = [c.strip() for c in ln[ln.find("|"):].strip().strip("|").split("|")] if "|" in ln else []
        if len(cells) == 2:
            header = f"{cells[0]}: {cells[1]}"
        elif len(cells) >= 3 and header and _in_range(size, cells[0]):
            chosen.append(f"{header} | {cells[0]} | {cells[1]} | {cells[2]}")
    res["proto_lines"] = list(dict.fromkeys(chosen))
    res["carried_by_cuda_ipc"] = any("cuda_ipc" in ln for ln in chosen)
    return res


def _in_range(size: int, text: str) -> bool:
    """Whether ``size`` lies in a UCX range cell such as ``16353..inf``, ``8K..16352`` or ``0``."""
    def num(t: str) -> float:
        t = t.strip()
        if t == "inf":
            return float("inf")
        m = re.fullmatch(r"(\d+)([KMG]?)", t)
        if not m:
            raise ValueError(t)
        return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]

    try:
        lo, _, hi = text.partition("..")
        return num(lo) <= size <= num(hi or lo)
    except ValueError:
        return False


def parse_perftest_json(out: str) -> dict[str, Any]:
    """Our and ucx_perftest's overall bandwidth per size from ``--json`` lines."""
    rows = []
    for ln in out.splitlines():
        if not ln.startswith("{"):
            continue
        d = json.loads(ln)
        base = d.get("baselines", {}).get("ucx_perftest", {})
        rows.append({"test": d["test"], "size": d["size"], "ucxkv_MBps": d.get("overall_bw_mbs"),
                     "ucx_perftest_MBps": base.get("overall_bw_mbs"), "ucx_perftest_note": base.get("skipped"),
                     "kv_mode": d.get("kv_mode"), "verified": d.get("verified"), "client_tls": d.get("client_tls"),
                     "server_tls": d.get("server_tls")})
    if not rows:
        raise ValueError("no JSON result line from ucxkv-perftest")
    return {"rows": rows}


def summarise_perftest(runs: dict[str, list[dict[str, Any]]], copy_mbps: float | None) -> list[dict[str, Any]]:
    """Median over runs per (test, size), with the ratios the report shows."""
    out = []
    for key, rows in runs.items():
        ours = [r["ucxkv_MBps"] for r in rows if r.get("ucxkv_MBps")]
        ucx = [r["ucx_perftest_MBps"] for r in rows if r.get("ucx_perftest_MBps")]
        m_ours = statistics.median(ours) if ours else None
        m_ucx = statistics.median(ucx) if ucx else None
        out.append({
            "case": key, "runs": len(rows), "ucxkv_MBps": m_ours, "ucx_perftest_MBps": m_ucx,
            "copy_MBps": copy_mbps,
            "ucxkv_over_ucx_perftest": (m_ours / m_ucx) if m_ours and m_ucx else None,
            "ucxkv_over_copy": (m_ours / copy_mbps) if m_ours and copy_mbps else None,
            "ucx_perftest_over_copy": (m_ucx / copy_mbps) if m_ucx and copy_mbps else None,
            "verified": all(r.get("verified") for r in rows) if rows[0]["test"] == "kv_bw" else None,
            "tls": rows[0].get("client_tls"),
            "ucx_perftest_note": next((r["ucx_perftest_note"] for r in rows if r.get("ucx_perftest_note")), None),
        })
    return out


def gpu_test_files() -> list[str]:
    """Test files that mark anything with ``pytest.mark.gpu`` (``-m gpu`` selects within them)."""
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py"))):
        with open(path) as f:
            if "mark.gpu" in f.read():
                out.append(os.path.relpath(path, ROOT))
    return out


def _git_head() -> str:
    try:
        p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                           timeout=10)
        return p.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


# --------------------------------------------------------------------------- report
def _fmt(x: Any, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def render_markdown(doc: dict[str, Any]) -> str:
    """The human report: summary table, results, then each step's output excerpt."""
    r = doc["results"]
    host = doc["mode"].startswith("host")
    lines = []
    if host:
        lines += ["> **HOST MODE: every step ran against host memory to test this script. "
                  "Nothing here is a GPU result.**", ""]
    lines += [f"# gpu-check report ({doc['mode']})", "",
              f"- date: {doc['date']}; commit {doc['git']}; host {doc['host']} ({doc['cpus']} CPUs)",
              f"- GPU: {doc['gpu'] or '(none)'}",
              f"- total {doc['total_s']} s of a {doc['budget_s']:.0f} s budget; installs {doc['install_s']} s", "",
              "## Steps", "", "| step | status | seconds | note |", "| --- | --- | ---: | --- |"]
    for s in doc["steps"]:
        note = (s.get("why") or "").replace("|", "\\|")[:160]
        lines.append(f"| {s['name']} | {s['status']} | {s['duration_s']:.1f} | {note} |")
    lines += ["", "## Results", ""]
    ub = r.get("ucx_build") or {}
    if ub.get("version"):
        lines.append(f"- UCX {ub['version']}, built {' '.join(ub['configure']) or '(flags not shown)'}")
    ut = r.get("ucx_transports") or {}
    if ut.get("transports"):
        has = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in ut["has"].items())
        lines += [f"- UCX transports: {', '.join(ut['transports'])}", f"- CUDA transports: {has}"]
    tests = r.get("tests") or {}
    if tests.get("counts"):
        lines.append(f"- `pytest -m gpu`: {', '.join(f'{v} {k}' for k, v in tests['counts'].items())}")
    proto = r.get("proto") or {}
    if "bit_exact" in proto:
        lines += [f"- proto: {proto['bytes'] >> 20} MiB {proto['src']}->{proto['dst']} send_tensor, "
                  f"bit-exact {proto['bit_exact']}, {proto['seconds'] * 1e3:.1f} ms; "
                  f"cuda_ipc named by UCX_PROTO_INFO: {proto.get('carried_by_cuda_ipc')}", "",
                  "```", *(proto.get("proto_lines") or ["(UCX printed no protocol lines)"]), "```", ""]
    copy = r.get("copy") or {}
    if copy.get("MB/s"):
        lines.append(f"- torch copy {copy['device']} {copy['bytes'] >> 20} MiB: {copy['MB/s']:.0f} MB/s "
                     "(the physical reference)")
    perf = r.get("perftest") or []
    if perf:
        lines += ["", "Bandwidth, MB/s (= MiB/s, overall, median of the runs):", "",
                  "| case | runs | ucxkv | ucx_perftest | torch copy | ucxkv/ucx_perftest | ucxkv/copy | "
                  "ucx_perftest/copy | TLS |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for p in perf:
            lines.append(f"| {p['case']} | {p['runs']} | {_fmt(p['ucxkv_MBps'])} | {_fmt(p['ucx_perftest_MBps'])} | "
                         f"{_fmt(p['copy_MBps'])} | {_fmt(p['ucxkv_over_ucx_perftest'], '.2f')} | "
                         f"{_fmt(p['ucxkv_over_copy'], '.2f')} | {_fmt(p['ucx_perftest_over_copy'], '.2f')} | "
                         f"{p['tls']} |")
            if p.get("verified") is not None:
                lines.append(f"|   kv_bw bit-exact: {p['verified']} | | | | | | | | |")
    prof = (r.get("profile") or {}).get("top")
    if prof:
        lines += ["", "The sender of a 1 MiB `tensor_bw`, by own time (cProfile):", "", "```", *prof, "```"]
    lines += ["", "## Output of each step", ""]
    for s in doc["steps"]:
        lines += [f"### {s['name']}: {s['status']} ({s['duration_s']:.1f} s)", ""]
        if s.get("command"):
            lines += [f"`{s['command']}`", ""]
        if s.get("excerpt"):
            lines += ["```", s["excerpt"], "```", ""]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- helper subcommands
def _parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", text.strip().upper())
    if not m:
        raise SystemExit(f"gpu-check: bad size {text!r} (e.g. 64M)")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]


def proto_main(args: argparse.Namespace) -> int:
    """Sender side: start a receiver process, send one tensor of ``--size`` bytes, print a JSON verdict."""
    import torch

    from transport import Pipe

    size = _parse_size(args.size)
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    recv = subprocess.Popen([sys.executable, "-m", "bench.gpu_check", "proto-recv", "--mem", args.mem,
                             "--size", args.size], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        early = []  # anything UCX prints before the address line is kept for the report
        for _ in range(1000):
            first = recv.stdout.readline()  # type: ignore[union-attr]
            if not first or first.startswith("ADDR "):
                break
            early.append(first)
        if not first.startswith("ADDR "):
            raise RuntimeError(f"proto receiver exited (rc={recv.wait(10)}) without reporting its address: "
                               f"{''.join(early)[-500:]!r}")
        first = first.strip()
        sys.stdout.write("".join(early))
        src = _pattern(size).to(args.mem)
        if src.device.type == "cuda":
            torch.cuda.synchronize()
        with Pipe.connect(first[5:], timeout_s=30) as pipe:
            t0 = time.perf_counter()
            pipe.send_tensor(src, timeout=30)
            verdict = pipe.recv_tensor(device="cpu", timeout=30)  # the receiver's bit-exact check
            dt = time.perf_counter() - t0
        rest, _ = recv.communicate(timeout=30)
        sys.stdout.write(rest)
        ok = verdict is not None and bool(verdict.item())
        print(json.dumps({"bytes": size, "src": args.mem, "dst": args.mem, "bit_exact": ok, "seconds": dt}),
              flush=True)
        return 0 if ok else 1
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()


def proto_recv_main(args: argparse.Namespace) -> int:
    """Receiver side of ``proto``: print ``ADDR host:port``, receive, answer 1 if bit-exact."""
    import torch

    from transport import Pipe

    size = _parse_size(args.size)
    with Pipe.listen("127.0.0.1", 0, timeout_s=30, device=args.mem) as pipe:
        print(f"ADDR {pipe.address}", flush=True)
        got = pipe.recv_tensor(timeout=30)
        same = got is not None and got.device.type == torch.device(args.mem).type and torch.equal(
            got.cpu(), _pattern(size))
        pipe.send_tensor(torch.tensor([int(same)], dtype=torch.uint8), timeout=30)
    return 0


def _pattern(size: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(size)
    return torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g)


def copybw_main(args: argparse.Namespace) -> int:
    """Print one JSON line: ``torch`` copy bandwidth on ``--device`` (bytes copied per second)."""
    import torch

    size = _parse_size(args.size)
    a = torch.ones(size, dtype=torch.uint8, device=args.device)
    b = torch.empty_like(a)
    cuda = a.device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(3):
        b.copy_(a)
    sync()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        b.copy_(a)
        sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(json.dumps({"device": str(a.device), "bytes": size, "iters": args.iters, "median_s": med,
                      "MB/s": size / med / MIB}), flush=True)
    return 0


# --------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    run = sub.add_parser("run", help="the whole check (the default)")
    for p in (ap, run):
        p.add_argument("--out", default="gpu-report", help="report folder (default %(default)s)")
        p.add_argument("--host-mode", action="store_true",
                       help="no GPU: run the steps against host memory with this interpreter, install nothing")
        p.add_argument("--steps", default="", help=f"comma list out of {','.join(STEPS)} (default all)")
        p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run, installs included")
        p.add_argument("--timeout", action="append", default=[], metavar="STEP=SECONDS",
                       help="override one step's time limit (repeatable)")
        p.add_argument("--runs", type=int, default=3, help="perftest runs per case (median reported)")
        p.add_argument("--quick", action="store_true", help="small sizes, one run (for testing the script)")
        p.add_argument("--python", default=None, help="interpreter for the steps (default .venv-gpu's)")
        p.add_argument("--no-install", action="store_true",
                       help="install nothing: --python already has the CUDA stack and the project")
        p.add_argument("--base-python", default=sys.executable, help="interpreter that creates .venv-gpu")
    pr = sub.add_parser("proto", help="one CUDA->CUDA send_tensor between two processes")
    pr2 = sub.add_parser("proto-recv", help=argparse.SUPPRESS)
    for p in (pr, pr2):
        p.add_argument("--mem", default="cuda")
        p.add_argument("--size", default="64M")
    cb = sub.add_parser("copybw", help="torch copy bandwidth on one device")
    cb.add_argument("--device", default="cuda")
    cb.add_argument("--size", default="256M")
    cb.add_argument("--iters", type=int, default=20)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point; see the module docstring for what runs and the exit status."""
    args = build_parser().parse_args(argv)
    if args.cmd == "proto":
        return proto_main(args)
    if args.cmd == "proto-recv":
        return proto_recv_main(args)
    if args.cmd == "copybw":
        return copybw_main(args)
    args.gpu = None
    if not args.host_mode:
        args.gpu = detect_cuda()
        if args.gpu is None:
            print(f"gpu-check: {NO_CUDA} (no GPU in nvidia-smi -L, no /dev/nvidia[0-9]*); nothing installed, "
                  "nothing run", flush=True)
            return 0
        print(f"gpu-check: {args.gpu}", flush=True)
    return Check(args).run()


if __name__ == "__main__":
    sys.exit(main())
