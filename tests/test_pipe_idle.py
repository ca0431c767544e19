"""An idle pipe uses (almost) no CPU: a listener with one idle peer, a consumer waiting for data."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

# What the design sets is wake-ups per second (voluntary context switches, all threads of the
# process): 8-10 over these 4 s (the first second's ticks included), 4-6 at steady state, measured
# with slow idle ticks and one heartbeat a second; a thread back on 50 ms ticks adds 20. What
# they cost in CPU is the VM's: a wake-up after a long sleep took 0.3-5 ms of CPU in session 7
# (0.3-1.1 % of a core here) and 0.7-8 ms in session 9 (1.6-3.4 %, either code), so the CPU bound
# only catches a spin (48-99 % of a core before the fix below) or a storm of wake-ups.
MAX_WAKEUPS_PER_S = 15.0
MAX_IDLE_PERCENT = 6.0


# tcp: the consumer used to spin (48-99 % of a core, about every other run) while the idle
# listener never progressed its worker and so never acked the consumer's UCX tcp connection
# (its socket kept write interest armed); the progress thread's tick fixed it (docs/bench.md).
# into: the consumer waits in recv_tensors(out=...), whose compiled window sleeps in the engine's wait
@pytest.mark.parametrize("tls,into", [("tcp", False), ("sm", False), ("sm", True)])
def test_idle_listener_and_waiting_consumer_use_no_cpu(tls, into):
    # a process of its own per transport: the UCX engine is per process
    res = subprocess.run([sys.executable, "-m", "bench.idle_cpu", "--tls", tls, "--seconds", "4"]
                         + (["--into"] if into else []),
                         capture_output=True, text=True, timeout=180, env=dict(os.environ))
    assert res.returncode == 0, res.stderr[-2000:]
    how = r"recv_tensors\(out=\) waiting" if into else r"recv_tensor waiting"
    m = re.search(r"listener ([\d.]+)% of a core, consumer \(" + how + r"\) ([\d.]+)% of a core; "
                  r"wake-ups per second: listener ([\d.]+), consumer ([\d.]+)", res.stdout)
    assert m, res.stdout
    listener, consumer, l_wakes, c_wakes = map(float, m.groups())
    assert l_wakes < MAX_WAKEUPS_PER_S, f"listener with an idle peer woke {l_wakes} times a second"
    assert c_wakes < MAX_WAKEUPS_PER_S, f"consumer waiting in recv_tensor woke {c_wakes} times a second"
    assert listener < MAX_IDLE_PERCENT, f"listener with an idle peer used {listener}% of a core"
    assert consumer < MAX_IDLE_PERCENT, f"consumer waiting in recv_tensor used {consumer}% of a core"
