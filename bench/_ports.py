"""Free TCP ports for servers that bind later (vLLM, the KV server, ucx_perftest)."""

from __future__ import annotations

import random
import socket


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = open("/proc/sys/net/ipv4/ip_local_port_range").read().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago, chosen *below* the kernel's ephemeral range.

    A port the kernel handed out for ``bind(0)`` is exactly what the next process's
    own ``bind(0)`` (vLLM picks its internal ZeroMQ ports that way) may receive in the
    seconds before our server binds it; ports outside that range are not handed out.
    """
    lo, _ = _ephemeral_range()
    for _ in range(200):
        port = random.randrange(max(1024, lo - 12000), lo)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a crowded range: fall back to any free port
        s.bind((host, 0))
        return int(s.getsockname()[1])
