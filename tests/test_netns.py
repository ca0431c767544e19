"""Multi-node for real on one machine: network namespaces as hosts (see tests/netns.py, docs/multinode.md).

Every process runs inside a namespace with ``UCX_TLS=tcp``; the only addresses used are
the ones the fixture gave its namespaces. Root only (skipped elsewhere, with the reason).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Iterator

import pytest

from tests import netns as N
from tests.netns import NetNS, kill_group, read_event

PEER_TIMEOUT = 3.0  # short heartbeat timeout for the partition tests
MiB = 1 << 20


@pytest.fixture
def netns2() -> Iterator[NetNS]:
    yield from N.make(2)


@pytest.fixture
def netns3() -> Iterator[NetNS]:
    yield from N.make(3)


def _env(**kw: str) -> dict:
    # listeners here bind non-loopback addresses, which needs authentication (or an explicit
    # UCXKV_AUTH=none): every host gets the same shared secret, as a real cluster would
    env = dict(os.environ, UCX_TLS="tcp", UCXKV_AUTH="secret", UCXKV_SECRET="netns-test-secret-0123456789")
    for k in ("UCX_NET_DEVICES", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(k, None)
    env.update(kw)
    return env


def test_fixture_hosts_are_separate(netns3: NetNS) -> None:
    """Each host sees only its own address; the root namespace has no route into the subnet."""
    for h in netns3.hosts:
        out = netns3.run(h, ["ip", "-4", "-o", "addr", "show"], timeout=20).stdout
        mine = [ln.split()[3] for ln in out.splitlines()]
        assert sorted(mine) == sorted(["127.0.0.1/8", f"{netns3.addr[h]}/24"]), out
    root = N._ip("-4", "route", "get", netns3.addr[netns3.hosts[0]], check=False).stdout
    assert "dev ukv" not in root and "br0" not in root


# ----------------------------------------------------------------------------- a. transport
def test_pipe_across_hosts_is_bit_exact_and_loopback_bind_is_not_reachable(netns2: NetNS) -> None:
    a, b = netns2.hosts
    sizes = f"{3},{1000},{16 * MiB},{64 * MiB + 4}"
    r = netns2.python(a, "pipe-recv", netns2.addr[a], sizes, "10", "1", env=_env())
    ev = read_event(r, 120, "listening")
    assert ev["address"].startswith(netns2.addr[a] + ":")
    s = netns2.python(b, "pipe-send", sizes, "10", env=_env())
    s.stdin.write(ev["address"] + "\n")
    s.stdin.close()
    got = [read_event(r, 120, "got") for _ in range(4)]
    assert all(g["exact"] for g in got), got
    assert read_event(r, 60, "done")["n"] == 4
    done = read_event(s, 60, "done")
    assert done["sent"] == 4 and done["reply_exact"], done
    assert done["peer"].endswith("@" + ev["address"])

    # the same listener bound to 127.0.0.1 in A: B dialling A's address at that port gets nowhere
    r2 = netns2.python(a, "pipe-recv", "127.0.0.1", "8", "10", "1", env=_env())
    port = read_event(r2, 120, "listening")["address"].rsplit(":", 1)[1]
    s2 = netns2.python(b, "pipe-send", "8", "10", env=_env())
    s2.stdin.write(f"{netns2.addr[a]}:{port}\n")
    s2.stdin.close()
    err = read_event(s2, 60, "error")
    assert err["type"] == "PeerTimeoutError" and f"{netns2.addr[a]}:{port}" in err["message"], err
    # ... and B's own 127.0.0.1 is B, not A
    s3 = netns2.python(b, "pipe-send", "8", "10", env=_env())
    s3.stdin.write(f"127.0.0.1:{port}\n")
    s3.stdin.close()
    assert read_event(s3, 60, "error")["type"] == "PeerTimeoutError"


# ----------------------------------------------------------------------------- c. partitions
def test_partition_mid_transfer_errors_within_peer_timeout_then_recovers(netns2: NetNS) -> None:
    """64 MiB tensors streaming A <- B; A's link goes down: both sides fail within the peer
    timeout with an error naming the peer; link back up: a new Pipe in the same processes works."""
    a, b = netns2.hosts
    sizes = ",".join([str(64 * MiB)] * 40) + ";" + ",".join([str(64 * MiB)] * 2 + ["123"])
    r = netns2.python(a, "pipe-recv", netns2.addr[a], sizes, str(PEER_TIMEOUT), "2", env=_env())
    ev = read_event(r, 120, "listening")
    s = netns2.python(b, "pipe-send", sizes, str(PEER_TIMEOUT), env=_env())
    s.stdin.write(ev["address"] + "\n")
    s.stdin.flush()
    for _ in range(2):
        assert read_event(r, 120, "got")["exact"]
    t0 = time.monotonic()
    netns2.link_down(a)
    rerr = read_event(r, PEER_TIMEOUT + 15, "error")
    serr = read_event(s, PEER_TIMEOUT + 15, "error")
    elapsed = time.monotonic() - t0
    for e in (rerr, serr):
        assert e["type"] in ("PeerDeadError", "PeerTimeoutError", "PeerClosedError"), e
        assert "silent" in e["message"] or "timed out" in e["message"], e
        assert e["waited_s"] < PEER_TIMEOUT + 10, e
    assert ev["address"] in serr["message"]  # the sender names the host it lost
    assert elapsed < PEER_TIMEOUT + 15

    netns2.link_up(a)
    ev2 = read_event(r, 60, "listening")
    s.stdin.write(ev2["address"] + "\n")
    s.stdin.close()
    got = [read_event(r, 120, "got") for _ in range(3)]
    assert all(g["exact"] for g in got) and got[-1]["nbytes"] == 123
    assert read_event(r, 60, "done")["round"] == 1
    assert read_event(s, 60, "done")["reply_exact"]


def test_lookup_server_partition_fetch_errors_lease_frees_and_recovers(netns2: NetNS) -> None:
    """Producer (LookupServer) in A, consumer in B. A fetch during a partition fails within the
    client's timeout; entries never fetched are released by their lease; after the link is back
    a new client fetches new entries, nothing restarted."""
    a, b = netns2.hosts
    lease = 4.0
    prod = netns2.python(a, "lookup-serve", netns2.addr[a], str(lease), env=_env())
    addr = read_event(prod, 120, "listening")["address"]
    assert addr.startswith(netns2.addr[a] + ":")
    cons = netns2.python(b, "lookup-fetch", "5", env=_env())

    def tell(p, line: str) -> None:
        p.stdin.write(line + "\n")
        p.stdin.flush()

    for rid in ("r1", "r2", "r3"):
        tell(prod, f"insert {rid} {8 * MiB}")
        read_event(prod, 30, "inserted")
    tell(cons, f"connect {addr}")
    read_event(cons, 60, "connected")
    tell(cons, f"fetch r1 {8 * MiB}")
    f = read_event(cons, 60, "fetched")
    assert f["found"] and f["exact"], f

    netns2.link_down(a)
    t0 = time.monotonic()
    tell(cons, f"fetch r2 {8 * MiB}")
    err = read_event(cons, 30, "error")
    assert err["type"] == "PeerUnavailableError" and addr in err["message"], err
    assert time.monotonic() - t0 < 5 + 10
    time.sleep(lease + 2)  # r2, r3 were never fetched: their lease ends on the producer
    tell(prod, "stats")
    st = read_event(prod, 30, "stats")
    assert st["bytes_used"] == 0 and st["num_entries"] == 0 and st["expired"] == 2, st

    netns2.link_up(a)
    tell(prod, f"insert r4 {8 * MiB}")
    read_event(prod, 30, "inserted")
    tell(cons, f"connect {addr}")  # the broken client is replaced; the server was never restarted
    read_event(cons, 60, "connected")
    tell(cons, f"fetch r4 {8 * MiB}")
    f = read_event(cons, 60, "fetched")
    assert f["found"] and f["exact"], f
    tell(cons, "quit")
    tell(prod, "quit")


# ----------------------------------------------------------------------------- d. bench row
def _libucx() -> str | None:
    try:
        import libucx  # noqa: F401
    except ImportError:
        return None
    d = os.path.dirname(libucx.__file__)
    return d if os.path.exists(os.path.join(d, "bin", "ucx_perftest")) else None


def test_bench_row_perftest_and_ucx_perftest_between_namespaces(netns2: NetNS) -> None:
    a, b = netns2.hosts
    env = _env()
    args = ["-p", "13411", "--tls", "tcp", "-t", "tensor_bw", "-s", "1M,64M", "--no-progress"]
    srv = netns2.popen(a, [sys.executable, "-m", "bench.perftest", "--bind", netns2.addr[a], *args], env=env)
    try:
        time.sleep(3)
        c = netns2.run(b, [sys.executable, "-m", "bench.perftest", netns2.addr[a], *args], env=env, timeout=300)
        print(c.stdout)
        assert c.returncode == 0, c.stderr[-3000:]
        assert c.stdout.count("Final:") == 2, c.stdout
    finally:
        kill_group(srv)

    libucx = _libucx()
    if libucx is None:
        pytest.skip("libucx with ucx_perftest not installed")
    uenv = dict(env, LD_LIBRARY_PATH=os.path.join(libucx, "lib"))
    exe = os.path.join(libucx, "bin", "ucx_perftest")
    for size in (MiB, 64 * MiB):
        uargs = ["-p", "13412", "-t", "tag_bw", "-s", str(size), "-n", "200" if size == MiB else "20"]
        srv = netns2.popen(a, [exe, *uargs], env=uenv)
        try:
            time.sleep(2)
            c = netns2.run(b, [exe, netns2.addr[a], *uargs], env=uenv, timeout=120)
            print(c.stdout)
            assert c.returncode == 0, c.stderr[-3000:]
            assert "Final:" in c.stdout
        finally:
            kill_group(srv)


# ----------------------------------------------------------------------------- advertised address
def test_advertise_host_refuses_non_local_and_loopback_mismatch() -> None:
    """Pure logic, no traffic: 192.0.2.1 (TEST-NET-1) is never a local address."""
    pytest.importorskip("vllm")
    from kv_transfer.errors import KVTransferError
    from kv_transfer.vllm_connector import resolve_advertise_host

    with pytest.raises(KVTransferError, match="192.0.2.1.*not an address of this host"):
        resolve_advertise_host("192.0.2.1")
    with pytest.raises(KVTransferError, match="loopback listener cannot be reached"):
        resolve_advertise_host("127.0.0.1", "192.0.2.1")
    with pytest.raises(KVTransferError, match="does not exist"):
        resolve_advertise_host("0.0.0.0", None, "ukv-no-such-if0")
    assert resolve_advertise_host("127.0.0.1") == "127.0.0.1"
    assert resolve_advertise_host("0.0.0.0", "192.0.2.1") == "192.0.2.1"  # NAT: allowed, warned


_RESOLVE = """
import json, sys
from kv_transfer.errors import KVTransferError
from kv_transfer.vllm_connector import resolve_advertise_host as r
out = {"wild": r("0.0.0.0"), "eth0": r("0.0.0.0", None, "eth0"), "own": r(sys.argv[1])}
for k, args in {"foreign": (sys.argv[2],), "lo_adv": ("127.0.0.1", sys.argv[1])}.items():
    try:
        out[k] = r(*args)
    except KVTransferError as e:
        out[k] = "error: " + str(e)
print(json.dumps(out))
"""


def test_advertise_host_inside_a_namespace(netns2: NetNS) -> None:
    """In host A, a wildcard kv_host advertises A's address (not the shared host name, which
    other namespaces resolve to themselves), and B's address is refused as kv_host."""
    pytest.importorskip("vllm")
    a, b = netns2.hosts
    c = netns2.run(a, [sys.executable, "-c", _RESOLVE, netns2.addr[a], netns2.addr[b]], env=_env(), timeout=180)
    assert c.returncode == 0, c.stderr[-3000:]
    out = json.loads(c.stdout.strip().splitlines()[-1])
    assert out["wild"] == out["eth0"] == out["own"] == netns2.addr[a], out
    assert out["foreign"].startswith("error:") and netns2.addr[a] in out["foreign"], out
    assert out["lo_adv"].startswith("error:"), out


# ----------------------------------------------------------------------------- b. vLLM, scripts unchanged
def _http(ns: NetNS, host: str, url: str, body: dict | None = None, timeout: float = 120) -> tuple[int, str]:
    p = ns.python(host, "http", url, json.dumps(body) if body is not None else "-", str(timeout), env=_env())
    try:
        ev = read_event(p, timeout + 30, "http")
    finally:
        kill_group(p, 1)
    return ev["status"], ev["body"]


def _tail(path: str, n: int = 4000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def test_1p1d_scripts_across_three_hosts_match_single_instance(netns3: NetNS, tmp_path) -> None:
    """prefill_node.sh in A, decode_node.sh in B, proxy_node.sh in C, only their documented
    environment variables, UCX_TLS=tcp. Greedy answers through the proxy equal decode's own
    answers (no kv_transfer_params); the KV really came over from A's advertised address."""
    pytest.importorskip("vllm")
    from bench.tiny_model import make_tiny_model, sample_prompts

    a, b, c = netns3.hosts
    A, B, C = (netns3.addr[h] for h in (a, b, c))
    model = str(make_tiny_model(tmp_path / "model"))
    root = N.REPO_ROOT
    common = dict(PYTHON=sys.executable, MODEL=model, MAX_MODEL_LEN="512", VLLM_CPU_KVCACHE_SPACE="1",
                  HEALTH_TIMEOUT="900")
    logs = {k: str(tmp_path / f"{k}.log") for k in ("prefill", "decode", "proxy")}
    procs = {}

    def start(name: str, host: str, script: str, **env: str):
        f = open(logs[name], "w")
        procs[name] = netns3.popen(host, ["bash", os.path.join(root, "scripts", script)],
                                   env=_env(**common, **env), stdout=f, stderr=subprocess.STDOUT)
        f.close()

    start("prefill", a, "prefill_node.sh", PREFILL_HOST=A, VLLM_CPU_OMP_THREADS_BIND="0",
          KV_EXTRA_CONFIG='"lease_s": 60')
    start("decode", b, "decode_node.sh", DECODE_HOST=B, PREFILL_HOST=A, VLLM_CPU_OMP_THREADS_BIND="1",
          KV_LOAD_FAILURE_POLICY="fail")  # a failed load errors instead of silently recomputing
    # a site-wide HTTP proxy (here: a closed port on C itself) must not capture the health checks
    dead_proxy = f"http://{C}:9"
    start("proxy", c, "proxy_node.sh", PREFILL_HOST=A, DECODE_HOST=B, PROXY_HOST=C, PROXY_PORT="8000",
          http_proxy=dead_proxy, HTTP_PROXY=dead_proxy)
    proxy = f"http://{C}:8000"
    try:
        deadline = time.monotonic() + 900
        while True:
            dead = {k: p.poll() for k, p in procs.items() if p.poll() is not None}
            assert not dead, f"exited early {dead}:\n" + "\n".join(f"== {k}\n{_tail(logs[k])}" for k in dead)
            if _http(netns3, c, proxy + "/health", timeout=10)[0] == 200:
                break
            assert time.monotonic() < deadline, "\n".join(f"== {k}\n{_tail(v)}" for k, v in logs.items())
            time.sleep(5)

        prompts = sample_prompts(3, 40, 100, seed=7)
        req = dict(model=model, max_tokens=8, temperature=0.0, ignore_eos=True)
        # prefill advertises A's address, which B dials
        st, body = _http(netns3, c, f"http://{A}:8100/v1/completions",
                         dict(req, prompt=prompts[0], max_tokens=1, kv_transfer_params={"do_remote_decode": True}))
        assert st == 200, body
        params = json.loads(body)["kv_transfer_params"]
        assert params["remote_host"] == A and params["do_remote_prefill"], params

        reference = []
        for p in prompts:  # single instance: decode computes the prompt itself
            st, body = _http(netns3, c, f"http://{B}:8200/v1/completions", dict(req, prompt=p))
            assert st == 200, body
            reference.append(json.loads(body)["choices"][0]["text"])
        served = []
        for p in prompts:
            st, body = _http(netns3, c, proxy + "/v1/completions", dict(req, prompt=p))
            assert st == 200, body + "\n" + _tail(logs["decode"])
            served.append(json.loads(body)["choices"][0]["text"])
        assert served == reference

        st, metrics = _http(netns3, c, f"http://{B}:8200/metrics", timeout=30)
        ext = [ln for ln in metrics.splitlines()
               if ln.startswith("vllm:prompt_tokens_by_source_total") and "external_kv_transfer" in ln]
        assert ext and float(ext[0].rsplit(" ", 1)[1]) > 0, ext  # decode loaded KV from A
        st, pm = _http(netns3, c, proxy + "/metrics", timeout=30)
        assert "ucxkv_proxy_missing_kv_transfer_params_total 0" in pm or \
            "missing_kv_transfer_params_total" not in pm, pm[-2000:]
    finally:
        for p in procs.values():
            kill_group(p, 20)
