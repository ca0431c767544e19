"""``UcxConnector``: vLLM's V1 KV connector, built on the LookupBuffer and the Pipe.

How a request moves (decode pulls; prefill stages):

1. The proxy sends the prompt to prefill with ``kv_transfer_params =
   {"do_remote_decode": true}`` and ``max_tokens=1``.
2. Prefill's scheduler tells its worker (connector metadata) which requests finish
   their prompt in this step. After the forward, the worker gathers each such
   request's blocks (all layers) into one staging tensor and inserts it into its
   :class:`~kv_transfer.LookupBuffer`, served on ``kv_host:kv_port``, keyed by the
   request id *and* its token ids, under a lease. The blocks go back to vLLM right
   away: prefill's block lifetime never depends on decode.
3. ``request_finished`` returns the ``kv_transfer_params`` decode needs (address,
   request id, token count, a compatibility record). The proxy copies them into
   the decode request.
4. Decode's scheduler sees ``do_remote_prefill``, checks compatibility, reserves
   blocks and marks the load asynchronous (the scheduler never blocks). Its worker
   fetches the entry over the data plane and scatters it into its *own* block ids
   in a background thread, then reports the request in ``finished_recving``; vLLM
   skips recomputing those tokens. A failed load reports its blocks through
   ``get_block_ids_with_load_errors`` and vLLM applies ``kv_load_failure_policy``.

Entries that decode never asks for are dropped when their lease ends (bytes
released). Transfer statistics go through ``get_kv_connector_stats``.

Why pull + staging, not a push into decode's blocks: decode decides when it has
blocks, so a push would need decode's block ids before prefill finishes (an extra
round trip through the proxy), and reading prefill's blocks in place would pin
them until decode comes (the failure mode behind vLLM #21570 and block leaks).
The staging copy costs one memcpy of the request's KV on prefill.

Configuration (``kv_connector_extra_config``), with defaults:

``kv_host`` ("127.0.0.1")  address prefill's KV server binds to: one of this host's
  addresses, or 0.0.0.0 / :: for all (a non-local one is refused at startup);
``kv_advertise_host`` (see below)  the address put in kv_transfer_params for decode to dial;
``kv_advertise_interface`` (unset)  advertise this interface's address instead (e.g. "eth0",
  "ib0"); an unknown interface or one without an address is refused at startup;
  without either: kv_host, or when kv_host is a wildcard the address of the interface
  holding the default route (else the first non-loopback one). A loopback kv_host with a
  non-loopback advertised address (or the reverse) is refused: decode could not connect;
``kv_port`` (the config's ``kv_port``, 14579)  prefill's KV server port;
``kv_buffer_size`` (2 GiB)  staging capacity on prefill (back-pressure past it);
``lease_s`` (30)  how long prefill keeps an unclaimed request's KV;
``insert_timeout_s`` (10)  how long a full buffer may block a save;
``fetch_timeout_s`` (30)  bound on one fetch on decode;
``ucx_tls`` (unset)  sets ``UCX_TLS`` for the worker process;
``debug_perturb_loaded_kv`` (false)  testing only: add noise to loaded KV (also per
  request with ``"ucxkv_debug_perturb": true`` in its kv_transfer_params).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from .errors import KVTransferError, PeerUnavailableError
from .lookup_buffer import LookupBuffer, LookupClient
from .connector import KVProducer, KVRequest
from .paged import PagedLayout, scatter_blocks

if TYPE_CHECKING:  # pragma: no cover
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

__all__ = ["UcxConnector", "UcxConnectorMetadata", "UcxKVConnectorStats"]

COMPAT_KEYS = ("model", "dtype", "num_layers", "num_kv_heads", "head_size", "block_size", "layout")


@dataclass
class SaveSpec:
    req_id: str
    token_ids: list[int]
    block_ids: list[int]


@dataclass
class LoadSpec:
    req_id: str
    remote_request_id: str
    remote_address: str
    token_ids: list[int]
    num_tokens: int  # tokens whose KV the producer holds
    block_ids: list[int]  # local blocks, in order
    skip_blocks: int  # leading blocks already computed locally (prefix cache)
    perturb: bool = False  # testing only: add noise to what was loaded


@dataclass
class UcxConnectorMetadata(KVConnectorMetadata):
    """What the scheduler tells its worker for one step."""

    to_save: list[SaveSpec] = field(default_factory=list)
    to_load: list[LoadSpec] = field(default_factory=list)
    cancel_loads: list[str] = field(default_factory=list)


@dataclass
class UcxKVConnectorStats(KVConnectorStats):
    """Transfer counters: bytes, requests, seconds spent, failures (per role)."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {"bytes_saved": 0, "requests_saved": 0, "save_s": 0.0, "bytes_loaded": 0,
                     "requests_loaded": 0, "load_s": 0.0, "load_failures": 0, "save_failures": 0}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        d = dict(self.data)
        if d.get("requests_loaded"):
            d["avg_load_ms"] = round(1000 * d["load_s"] / d["requests_loaded"], 3)
            d["load_MiBps"] = round(d["bytes_loaded"] / max(d["load_s"], 1e-9) / 2**20, 1)
        return d

    def is_empty(self) -> bool:
        return not any(self.data.values())


def _warm_up_transport() -> None:
    try:
        from transport import warm_up

        warm_up()
    except Exception as exc:  # noqa: BLE001 - the first load will report the real error
        log.debug("transport warm-up failed: %s", exc)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


_WILDCARDS = ("0.0.0.0", "::", "*", "")


def local_addresses() -> dict[str, list[str]]:
    """This host's (this network namespace's) interfaces and their IP addresses, IPv4 first."""
    try:
        import psutil

        out: dict[str, list[str]] = {}
        for name, addrs in psutil.net_if_addrs().items():
            v4 = [a.address for a in addrs if a.family == socket.AF_INET]
            v6 = [a.address.split("%")[0] for a in addrs if a.family == socket.AF_INET6]
            if v4 or v6:
                out[name] = v4 + v6
        return out
    except Exception:  # noqa: BLE001 - no psutil: loopback and what the host name resolves to
        names = {"127.0.0.1", "::1"}
        try:
            names.update(socket.gethostbyname_ex(socket.gethostname())[2])
        except OSError:
            pass
        return {"?": sorted(names)}


def _is_loopback(addr: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return addr == "localhost"


def _default_route_interface() -> str | None:
    """The interface of the IPv4 default route (read from /proc/net/route; no packet is sent)."""
    try:
        with open("/proc/net/route") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if len(cols) > 3 and cols[1] == "00000000" and int(cols[3], 16) & 1:
                    return cols[0]
    except OSError:
        pass
    return None


def resolve_advertise_host(kv_host: str, advertise: Any = None, interface: Any = None) -> str:
    """The address a producer puts in kv_transfer_params, checked against where it listens.

    Raises :class:`KVTransferError` (at startup, naming this host's addresses) when
    ``kv_host`` is not local, ``interface`` is unknown or has no address, or the
    advertised address cannot reach the listener (loopback vs. not).
    """
    local = local_addresses()
    mine = {a for addrs in local.values() for a in addrs}
    have = "; ".join(f"{n}: {', '.join(a)}" for n, a in sorted(local.items())) or "none"
    wildcard = kv_host in _WILDCARDS
    bind = kv_host
    if not wildcard and kv_host not in mine:
        try:
            bind = socket.gethostbyname(kv_host)
        except OSError:
            bind = kv_host
        if bind not in mine:
            raise KVTransferError(
                f"UcxConnector: kv_host {kv_host!r} is not an address of this host, so the KV listener cannot "
                f"bind to it (this host has {have}). Set kv_host (PREFILL_HOST in the scripts) to one of them, "
                f"or kv_host 0.0.0.0 with kv_advertise_host / kv_advertise_interface.")
    if interface:
        addrs = local.get(str(interface))
        if not addrs:
            raise KVTransferError(
                f"UcxConnector: kv_advertise_interface {interface!r} "
                f"{'has no IP address' if str(interface) in local else 'does not exist'} on this host "
                f"(interfaces: {have})")
        adv = addrs[0]
        if not wildcard and adv != bind:
            raise KVTransferError(
                f"UcxConnector: kv_advertise_interface {interface!r} has {adv}, but the KV listener binds to "
                f"kv_host {kv_host!r} only: decode could not connect. Use kv_host 0.0.0.0 or {adv}.")
    elif advertise:
        adv = str(advertise)
        if adv in _WILDCARDS:
            raise KVTransferError(f"UcxConnector: kv_advertise_host {adv!r} is a wildcard; decode needs an address")
    elif not wildcard:
        adv = kv_host
    else:
        dflt = _default_route_interface()
        cands = [a for a in local.get(dflt or "", []) if not _is_loopback(a)]
        cands += [a for n, addrs in sorted(local.items()) for a in addrs
                  if not _is_loopback(a) and ":" not in a and not a.startswith("169.254.")]
        adv = cands[0] if cands else "127.0.0.1"
        log.info("UcxConnector: kv_host %s: advertising %s (set kv_advertise_host or kv_advertise_interface "
                 "to choose; this host has %s)", kv_host, adv, have)
    if not wildcard and _is_loopback(bind) != _is_loopback(adv):
        raise KVTransferError(
            f"UcxConnector: the KV listener binds to kv_host {kv_host!r} but advertises {adv!r}: "
            + ("a loopback listener cannot be reached from another host; set kv_host to this host's address "
               f"reachable by decode (one of: {have}) or 0.0.0.0" if _is_loopback(bind) else
               "a loopback address only reaches the decode host itself, where nothing listens"))
    if advertise and adv not in mine and not _is_loopback(adv):
        log.warning("UcxConnector: kv_advertise_host %s is not an address of this host (%s); fine behind NAT, "
                    "otherwise decode cannot connect", adv, have)
    return adv


class UcxConnector(KVConnectorBase_V1):
    """The facade vLLM instantiates; the scheduler half and worker half share this class."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config, role, kv_cache_config)
        tc = self._kv_transfer_config
        get = tc.get_from_extra_config
        self.is_producer = bool(tc.is_kv_producer)
        self.is_consumer = bool(tc.is_kv_consumer)
        self.kv_host = str(get("kv_host", "127.0.0.1"))
        self.kv_port = int(get("kv_port", tc.kv_port))
        adv = get("kv_advertise_host", None)
        iface = get("kv_advertise_interface", None)
        if self.is_producer:  # a consumer's kv_host names the (remote) prefill node: nothing to check
            self.advertise_host = resolve_advertise_host(self.kv_host, adv, iface)
        else:
            self.advertise_host = str(adv) if adv else self.kv_host
        self.buffer_bytes = int(float(get("kv_buffer_size", 2 << 30)))
        self.lease_s = float(get("lease_s", 30.0))
        self.insert_timeout_s = float(get("insert_timeout_s", 10.0))
        self.fetch_timeout_s = float(get("fetch_timeout_s", 30.0))
        self.perturb = bool(get("debug_perturb_loaded_kv", False))
        self.block_size = int(vllm_config.cache_config.block_size)
        self.compat = self._compat_record(vllm_config, kv_cache_config)
        tls = get("ucx_tls", None)
        if tls and role == KVConnectorRole.WORKER:
            os.environ["UCX_TLS"] = str(tls)
        # scheduler state
        self._producer_reqs: dict[str, Any] = {}
        self._save_blocks: dict[str, list[int]] = {}
        self._saved: set[str] = set()
        self._pending_loads: list[LoadSpec] = []
        self._loading: set[str] = set()
        self._cancel: list[str] = []
        # worker state
        self._caches: list[torch.Tensor] = []
        self._layout: PagedLayout | None = None
        self._buffer: LookupBuffer | None = None
        self._producer: KVProducer | None = None
        self._server: Any = None
        self._clients: dict[str, LookupClient] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._done_recv: set[str] = set()
        self._done_send: set[str] = set()
        self._failed_blocks: set[int] = set()
        self._cancelled: set[str] = set()
        self._stats = UcxKVConnectorStats()
        log.info("UcxConnector %s (%s) kv server %s:%s", role.name,
                 "producer" if self.is_producer else "consumer", self.kv_host, self.kv_port)

    # ------------------------------------------------------------------ compat
    @staticmethod
    def _compat_record(vllm_config: Any, kv_cache_config: Any) -> dict[str, str]:
        spec = None
        try:
            spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
        except Exception:  # noqa: BLE001 - older vLLM: fall back to model config
            pass
        mc = vllm_config.model_config
        try:
            num_layers = mc.get_num_layers(vllm_config.parallel_config)
            kv_heads = mc.get_num_kv_heads(vllm_config.parallel_config)
            head = mc.get_head_size()
        except Exception:  # noqa: BLE001
            num_layers = kv_heads = head = -1
        layout = getattr(kv_cache_config, "kv_cache_layout", None) or "?"
        return {
            "model": os.path.basename(str(mc.model).rstrip("/")),
            "dtype": str(getattr(spec, "dtype", vllm_config.cache_config.cache_dtype)),
            "num_layers": str(num_layers),
            "num_kv_heads": str(getattr(spec, "num_kv_heads", kv_heads)),
            "head_size": str(getattr(spec, "head_size", head)),
            "block_size": str(getattr(spec, "block_size", vllm_config.cache_config.block_size)),
            "layout": str(layout),
        }

    def _compat_problem(self, remote: dict[str, str] | None) -> str | None:
        if not remote:
            return "the producer sent no compatibility record"
        bad = [k for k in COMPAT_KEYS if str(remote.get(k)) != self.compat.get(k)]
        if not bad:
            return None
        return "; ".join(f"{k}: prefill={remote.get(k)!r} decode={self.compat.get(k)!r}" for k in bad)

    # --------------------------------------------------------- scheduler side
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        params = request.kv_transfer_params or {}
        if not self.is_consumer or not params.get("do_remote_prefill") or request.request_id in self._loading:
            return 0, False
        problem = self._compat_problem(params.get("compat"))
        if problem:
            log.error("request %s: prefill and decode KV caches are incompatible (%s); recomputing locally",
                      request.request_id, problem)
            return 0, False
        n = min(int(params.get("remote_num_tokens", 0)), len(request.prompt_token_ids)) - num_computed_tokens
        if n <= 0:
            return 0, False
        return n, True

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        params = request.kv_transfer_params or {}
        if self.is_producer and params.get("do_remote_decode"):
            self._producer_reqs[request.request_id] = request
        if not (self.is_consumer and params.get("do_remote_prefill") and num_external_tokens > 0):
            return
        if request.request_id in self._loading:
            return
        block_ids = list(blocks.get_block_ids()[0])
        num_tokens = min(int(params["remote_num_tokens"]), len(request.prompt_token_ids))
        skip = request.num_computed_tokens // self.block_size
        self._pending_loads.append(LoadSpec(
            req_id=request.request_id,
            remote_request_id=str(params["remote_request_id"]),
            remote_address=f"{params['remote_host']}:{params['remote_port']}",
            token_ids=list(request.prompt_token_ids[:num_tokens]),
            num_tokens=num_tokens,
            block_ids=block_ids[:_cdiv(num_tokens, self.block_size)],
            skip_blocks=skip,
            perturb=self.perturb or bool(params.get("ucxkv_debug_perturb", False)),
        ))
        self._loading.add(request.request_id)
        params["do_remote_prefill"] = False  # a retry after failure recomputes instead of looping

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = UcxConnectorMetadata()
        if self.is_producer:
            n_sched = scheduler_output.num_scheduled_tokens
            for new in scheduler_output.scheduled_new_reqs:
                if new.req_id in self._producer_reqs:
                    self._save_blocks[new.req_id] = list(new.block_ids[0])
                    self._maybe_save(meta, new.req_id, new.num_computed_tokens + n_sched.get(new.req_id, 0))
            cached = scheduler_output.scheduled_cached_reqs
            for i, rid in enumerate(cached.req_ids):
                if rid in self._producer_reqs and rid not in self._saved:
                    nb = cached.new_block_ids[i]
                    if nb is not None:
                        if rid in cached.resumed_req_ids:
                            self._save_blocks[rid] = list(nb[0])
                        else:
                            self._save_blocks.setdefault(rid, []).extend(nb[0])
                    self._maybe_save(meta, rid, cached.num_computed_tokens[i] + n_sched.get(rid, 0))
        meta.to_load, self._pending_loads = self._pending_loads, []
        meta.cancel_loads, self._cancel = self._cancel, []
        return meta

    def _maybe_save(self, meta: UcxConnectorMetadata, rid: str, computed_after_step: int) -> None:
        req = self._producer_reqs[rid]
        n = len(req.prompt_token_ids)
        if rid in self._saved or computed_after_step < n:
            return
        blocks = self._save_blocks.get(rid, [])[:_cdiv(n, self.block_size)]
        meta.to_save.append(SaveSpec(rid, list(req.prompt_token_ids), blocks))
        self._saved.add(rid)

    def update_connector_output(self, connector_output: Any) -> None:
        for rid in connector_output.finished_recving or ():
            self._loading.discard(rid)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self._producer_reqs.pop(rid, None)
        self._save_blocks.pop(rid, None)
        if self.is_consumer and rid in self._loading:
            # The worker may still be writing into these blocks: keep them until it says it stopped.
            self._cancel.append(rid)
            return True, None
        if not (self.is_producer and rid in self._saved):
            self._saved.discard(rid)
            return False, None
        self._saved.discard(rid)
        if request.is_finished() and "ABORTED" in str(request.status):
            return False, None
        return False, {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_request_id": rid,
            "remote_host": self.advertise_host,
            "remote_port": self.kv_port,
            "remote_num_tokens": len(request.prompt_token_ids),
            "compat": dict(self.compat),
        }

    # ------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._caches = list(kv_caches.values())
        first = self._caches[0]
        num_blocks = getattr(self._kv_cache_config, "num_blocks", None) or first.shape[0]
        block_dim = 0 if first.shape[0] == num_blocks else next(
            (d for d, s in enumerate(first.shape) if s == num_blocks), 0)
        name = str(getattr(self._kv_cache_config, "kv_cache_layout", None) or f"block_dim{block_dim}")
        self._layout = PagedLayout(name=name, block_dim=block_dim)
        self._block_bytes = sum(self._layout.block_nbytes(c) for c in self._caches)  # one block, all layers
        log.info("UcxConnector: %d layers, per-layer cache %s %s, layout %s (block dim %d)",
                 len(self._caches), tuple(first.shape), first.dtype, name, block_dim)
        if self.is_producer:
            self._buffer = LookupBuffer(self.buffer_bytes, lease_s=self.lease_s)
            self._producer = KVProducer(self._buffer, self._caches, self._layout,
                                        insert_timeout_s=self.insert_timeout_s, lease_s=self.lease_s)
            self._server = self._buffer.serve(self.kv_host, self.kv_port)
            log.info("UcxConnector producer serving KV on %s", self._server.address)
        if self.is_consumer:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ucxkv-load")
            self._pool.submit(_warm_up_transport)  # UCX init takes ~0.5 s: not on the first request's path

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, UcxConnectorMetadata) or self._pool is None:
            return
        with self._lock:
            self._cancelled.update(meta.cancel_loads)
        for spec in meta.to_load:
            self._pool.submit(self._load, spec)

    def _client(self, address: str, fresh: bool = False) -> LookupClient:
        c = self._clients.get(address)
        if c is None or fresh or getattr(c, "_broken", None):
            if c is not None:
                c.close()
            c = LookupClient(address, timeout_s=self.fetch_timeout_s, device=self._caches[0].device)
            self._clients[address] = c
        return c

    def _load(self, spec: LoadSpec) -> None:
        t0 = time.monotonic()
        lo = spec.skip_blocks
        want = spec.block_ids[lo:]
        ok = False
        nbytes = 0
        try:
            with self._lock:
                cancelled = spec.req_id in self._cancelled
            client = self._client(spec.remote_address)
            if cancelled:
                client.abort(spec.remote_request_id)
                raise KVTransferError("request aborted before its KV was fetched")
            tokens = torch.tensor(spec.token_ids, dtype=torch.int64)
            try:
                m = client.fetch(tokens, None, request_id=spec.remote_request_id, wait_s=0.0)
            except PeerUnavailableError as exc:
                # A connection from before a producer restart fails once: redial and ask again.
                log.info("redialling producer %s after: %s", spec.remote_address, exc)
                client = self._client(spec.remote_address, fresh=True)
                m = client.fetch(tokens, None, request_id=spec.remote_request_id, wait_s=0.0)
            if m is None:
                raise KVTransferError(f"producer {spec.remote_address} has no KV for {spec.remote_request_id} "
                                      "(lease expired, aborted, or never saved)")
            layers = m.key if isinstance(m.key, list) else None
            if layers is None or len(layers) != len(self._caches):
                raise KVTransferError(f"producer sent {0 if layers is None else len(layers)} layers, "
                                      f"decode has {len(self._caches)}")
            for layer_idx, (cache, staged) in enumerate(zip(self._caches, layers)):
                part = staged[lo:lo + len(want)]
                if part.shape[0] != len(want):
                    raise KVTransferError(f"layer {layer_idx}: producer sent {staged.shape[0]} blocks, "
                                          f"decode expected {len(spec.block_ids)}")
                if spec.perturb:
                    part = part + torch.randn_like(part) * 1.0
                scatter_blocks([cache], self._layout, want, part.unsqueeze(0))
                nbytes += part.numel() * part.element_size()
            ok = True
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reported load error
            log.error("KV load for %s from %s failed: %s", spec.req_id, spec.remote_address, exc)
        with self._lock:
            if ok:
                self._stats.data["bytes_loaded"] += nbytes
                self._stats.data["requests_loaded"] += 1
                self._stats.data["load_s"] += time.monotonic() - t0
            else:
                self._failed_blocks.update(want)
                self._stats.data["load_failures"] += 1
            if spec.req_id in self._cancelled:
                self._cancelled.discard(spec.req_id)
                self._done_send.add(spec.req_id)  # frees the blocks held for an aborted request
            self._done_recv.add(spec.req_id)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads are asynchronous: vLLM waits on finished_recving instead

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return None  # saved whole in wait_for_save, once every layer of the step is written

    def wait_for_save(self) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, UcxConnectorMetadata) or self._buffer is None:
            return
        for spec in meta.to_save:
            t0 = time.monotonic()
            try:
                self._producer.save([KVRequest(spec.req_id, spec.token_ids, spec.block_ids)])
                with self._lock:
                    self._stats.data["bytes_saved"] += len(spec.block_ids) * self._block_bytes
                    self._stats.data["requests_saved"] += 1
                    self._stats.data["save_s"] += time.monotonic() - t0
            except Exception as exc:  # noqa: BLE001 - decode will see "no KV" and apply its policy
                log.error("saving KV of %s failed: %s", spec.req_id, exc)
                with self._lock:
                    self._stats.data["save_failures"] += 1

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        with self._lock:
            recv, self._done_recv = self._done_recv, set()
            send, self._done_send = self._done_send, set()
        return (send or None), (recv or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            bad, self._failed_blocks = self._failed_blocks, set()
        return bad

    def get_kv_connector_stats(self) -> Optional[KVConnectorStats]:
        with self._lock:
            if self._stats.is_empty():
                return None
            out = UcxKVConnectorStats(data=dict(self._stats.data))
            self._stats.reset()
        return out

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> Optional[KVConnectorStats]:
        return UcxKVConnectorStats(data=dict(data)) if data is not None else UcxKVConnectorStats()

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        for c in self._clients.values():
            c.close()
        self._clients.clear()
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None
