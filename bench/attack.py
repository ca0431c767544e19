"""Attack run (issue 15): every hostile-input class against real listeners, with RSS and fd baselines.

``python -m bench.attack [--consumers N] [--json FILE]`` starts, each in its own
process, a :class:`~transport.PipeListener` that echoes tensors (authentication
off, on loopback), the same with a shared secret, a ``LookupBuffer.serve`` and
an ``ucxkv-proxy`` (upstreams that refuse connections: every request it
forwards fails, as JSON). It then plays a hostile peer against them with raw
TCP, raw ZeroMQ and crafted frames, one class after another (the numbering is
issue 15's). After every attack it waits for the target's RSS and open file
descriptors to come back to their baseline (at most ``--settle`` seconds;
``RSS_SLACK_MIB`` and ``FD_SLACK`` of slack), checks that it still serves a
well-behaved client, and records before/after. It exits 1 if any check failed.

The attacks are the run's own inputs, written from the issue's descriptions,
not copies of ``tests/test_hostile_bounds.py``. Class 3 (an unterminated
multipart message) runs against the authenticated listener only: with
authentication off nothing bounds it (``docs/reliability.md``, threat model).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)

#: The secret of the run's own authenticated target (never a deployment's).
SECRET = "ucxkv-attack-run-secret-0123456789"
RSS_SLACK_MIB = 64
FD_SLACK = 3
_SPAWN = mp.get_context("spawn")


# -- measuring a process ------------------------------------------------------------------
def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` in MiB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def open_fds(pid: int) -> int:
    """How many file descriptors ``pid`` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- raw ZMTP 3.0: a peer that is not a ZeroMQ library ---------------------------------------
_GREETING = b"\xff" + b"\x00" * 7 + b"\x01\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32
_READY = b"\x05READY\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"


def zmtp_unterminated_parts(host: str, port: int, limit_bytes: int, part_bytes: int = 60_000,
                            timeout_s: float = 10.0) -> int:
    """Speak ZMTP 3.0 (NULL mechanism, as a DEALER) to ``host:port`` and send message parts that all
    say "more follows", never a last one, until ``limit_bytes`` went out or the listener dropped
    the connection. Returns the bytes sent. libzmq buffers such parts where the application cannot
    see them, and its ``MAXMSGSIZE`` bounds one part, not the message."""
    part = b"\x03" + struct.pack(">Q", part_bytes) + bytes(part_bytes)  # MORE | LONG frame
    sent = 0
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.sendall(_GREETING)
            got = b""
            while len(got) < len(_GREETING):
                chunk = s.recv(len(_GREETING) - len(got))
                if not chunk:
                    return sent
                got += chunk
            s.sendall(b"\x04" + bytes([len(_READY)]) + _READY)
            while sent < limit_bytes:
                s.sendall(part)
                sent += len(part)
    except OSError:  # reset, broken pipe or a listener that stopped reading: it refused us
        pass
    return sent
