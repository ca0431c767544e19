"""Shared fixtures: spawned peer processes that always get cleaned up."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import tempfile
from typing import Any, Iterator

import pytest

SPAWN = mp.get_context("spawn")


class Peers:
    """Starts peer processes from :mod:`tests.peers` and reads what they report."""

    def __init__(self) -> None:
        self.procs: list[Any] = []
        self.q = SPAWN.Queue()

    def start(self, target: Any, *args: Any) -> Any:
        q = SPAWN.Queue()
        p = SPAWN.Process(target=target, args=(q, *args), daemon=True)
        p.start()
        p.q = q  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    @staticmethod
    def get(p: Any, timeout: float = 120) -> tuple:
        try:
            return p.q.get(timeout=timeout)
        except queue_mod.Empty:
            raise AssertionError(f"peer process {p.pid} reported nothing within {timeout}s (alive={p.is_alive()})") from None

    def expect(self, p: Any, kind: str, timeout: float = 120) -> Any:
        msg = self.get(p, timeout)
        if msg[0] == "error":
            raise AssertionError(f"peer failed: {msg[1]}: {msg[2]}\n{msg[3]}")
        assert msg[0] == kind, msg
        return msg[1]

    def close(self) -> None:
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


@pytest.fixture
def peers() -> Iterator[Peers]:
    ps = Peers()
    try:
        yield ps
    finally:
        ps.close()


@pytest.fixture(scope="session", autouse=True)
def children_tmpdir() -> Iterator[str]:
    """Every process the tests start gets its TMPDIR in one directory of this session, removed at the end.

    vLLM puts its ZeroMQ ipc sockets and torch.distributed's file stores under TMPDIR, and an
    instance a test kills leaves them behind (thousands in /tmp after a few runs). This process
    keeps the temporary directory it had (read before the change: pytest's own files stay put).
    """
    tempfile.gettempdir()  # (cached now: this process keeps its own)
    d = tempfile.mkdtemp(prefix="ucxkv-tests-")  # (short: a socket path has at most 107 bytes)
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = d
    try:
        yield d
    finally:
        if old is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old
        shutil.rmtree(d, ignore_errors=True)
