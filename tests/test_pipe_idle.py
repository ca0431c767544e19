"""An idle pipe uses (almost) no CPU: a listener with one idle peer, a consumer waiting for data."""

from __future__ import annotations

import pytest

from bench.idle_cpu import measure

# Process CPU time over the idle window (all threads: progress thread, control-plane
# heartbeats). The engine sleeps on the worker's event fd: about 0.5-1.4 % measured here;
# the bound leaves room for a loaded machine's slower heartbeats.
MAX_IDLE_FRACTION = 0.03


@pytest.mark.parametrize("tls", ["tcp", "sm"])
def test_idle_listener_and_waiting_consumer_use_no_cpu(tls, monkeypatch):
    monkeypatch.setenv("UCX_TLS", tls)
    listener, consumer = measure(4.0)
    assert listener < MAX_IDLE_FRACTION, f"listener with an idle peer used {listener:.1%} of a core"
    assert consumer < MAX_IDLE_FRACTION, f"consumer waiting in recv_tensor used {consumer:.1%} of a core"
