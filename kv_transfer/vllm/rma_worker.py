"""Connector mode ``rma``: decode reads prefill's KV blocks in place (one-sided GET), nothing staged.

How ``kv_mode`` is chosen (:func:`choose_kv_mode`, the same answer in the
scheduler and worker processes since it reads only the config and
``UCX_TLS``): ``stage`` and ``rma`` are taken as given; ``auto`` picks per transport family
(TCP only, or anything else) from :data:`kv_transfer._kv_mode.AUTO_TABLE`, filled from the
bench (docs/bench.md, "kv_mode: rma vs stage"; ``ucxkv-perftest -t kv_bw --kv-mode auto``
runs the same rule): ``rma`` was faster in every paired run over shared memory and over
TCP, and stages nothing, so today ``auto`` means ``rma`` everywhere. The choice and its
reason are logged once per process. Hybrid models (several KV cache groups) work in both:
in rma a lease holds one block list per group and a load reads each group's blocks over
that group's layers (:mod:`kv_transfer.rma_kv`).

Prefill (producer, :class:`RmaTransfer` with ``is_producer``): instead of a
LookupBuffer, the rank serves a :class:`~kv_transfer.rma_kv.RmaKVServer` on
its KV port, with every layer cache registered once. A request whose prompt
finished is *offered* (its block ids under a lease); the scheduler returned
``delay_free=True`` for it, and the server's ``on_free`` (decode done, lease
expired, decode's pipe died, or the scheduler released an aborted request)
puts it in the worker's ``finished_sending`` set, which frees the blocks.
With ``retain_kv`` (decode failover) decode's ``Done`` and death do not free:
the blocks stay leased until a decode acknowledges the request answered in full
(:meth:`RmaTransfer.ack`) or the lease ends; the decode serving the request
renews it every ``lease_s / 3`` until the request finishes, so a decode that
dies stops renewing and the blocks go at most ``lease_s`` later.

Decode (consumer): one :class:`~kv_transfer.rma_kv.RmaKVClient` per producer
rank address, all over one set of registrations of this rank's caches; a load
GETs the blocks its prefix cache lacks straight into the request's blocks.
Any failure (producer dead mid-read, lease gone, hostile or stale descriptor)
fails every wanted block, so vLLM applies ``kv_load_failure_policy``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Optional, Sequence

import torch

import transport

from .._kv_mode import KV_MODES, auto_kv_mode
from ..errors import KVTransferError
from ..paged import PagedLayout
from ..rma_kv import RmaKVClient, RmaKVServer, register_layers
from ..tp_mapping import HeadRead
from .config import UcxConfig
from .metadata import LoadSpec, SaveSpec

log = logging.getLogger(__name__)

__all__ = ["KV_MODES", "choose_kv_mode", "RmaTransfer"]

_logged: set[str] = set()


def choose_kv_mode(config: UcxConfig) -> tuple[str, str]:
    """(``stage`` or ``rma``, why) for this instance's ``kv_mode`` and UCX transports.

    Deterministic (reads only the config and ``UCX_TLS``), so the scheduler and every
    worker process of an instance make the same choice.
    """
    mode = config.kv_mode
    if mode not in KV_MODES:
        raise KVTransferError(f"kv_mode {mode!r} is not one of {', '.join(KV_MODES)}")
    if mode != "auto":
        return mode, "set by kv_mode"
    choice, why = auto_kv_mode(config.ucx_tls or os.environ.get("UCX_TLS", ""))
    if why not in _logged:
        _logged.add(why)
        log.info("UcxConnector kv_mode %s", why)
    return choice, why


class RmaTransfer:
    """The rma-mode state of one worker rank (producer and/or consumer).

    Args:
        config: The connector's settings.
        caches: This rank's per-layer caches, KV cache group by group (a tensor shared by layers of
            several groups appears once per layer).
        layout: Their layout.
        on_sent: Called with a request id whose leased blocks may be freed (producer).
        group_layers: Layers per KV cache group in ``caches`` (default: one group of all).
    """

    def __init__(self, config: UcxConfig, caches: Sequence[torch.Tensor], layout: PagedLayout,
                 on_sent: Callable[[str], None], group_layers: Optional[Sequence[int]] = None):
        self.config = config
        self._caches = list(caches)
        self._group_layers = list(group_layers or [len(self._caches)])
        self._layout = layout
        self._on_sent = on_sent
        self.server: Optional[RmaKVServer] = None
        self._regs: list[transport.Registration] = []  # one per layer cache (consumer)
        self._owned_regs: list[transport.Registration] = []  # one per distinct tensor: what shutdown closes
        self._clients: dict[str, RmaKVClient] = {}
        self._lock = threading.Lock()
        self._gone: dict[tuple[str, str], None] = {}  # leases found gone (warned once), oldest first

    # ---------------------------------------------------------------- producer
    def serve(self, host: str, port: int) -> str:
        """Register the caches and serve their leased blocks on ``host:port``; returns the address."""
        self.server = RmaKVServer(self._caches, self._layout, host, port, lease_s=self.config.lease_s,
                                  on_free=self._on_sent, retain=self.config.retain_kv,
                                  group_layers=self._group_layers, options=self.config.pipe_options())
        return self.server.address

    def offer(self, specs: Sequence[SaveSpec]) -> None:
        """Lease each finished prompt's blocks to readers (no copy)."""
        for spec in specs:
            self.server.offer(spec.req_id, spec.token_ids, spec.block_ids, spec.more_groups)

    def release(self, req_ids: Sequence[str]) -> None:
        """Free the leases of requests no reader will come for (aborted on prefill)."""
        for rid in req_ids:
            if not self.server.release(rid, "aborted on prefill"):
                self._on_sent(rid)  # never offered (its save failed): vLLM still waits for it

    # ---------------------------------------------------------------- consumer
    def _client(self, address: str) -> RmaKVClient:
        with self._lock:
            if not self._regs:
                self._regs = register_layers(self._caches, "kv-dst-layer", self._owned_regs)
            c = self._clients.get(address)
            if c is None:
                c = self._clients[address] = RmaKVClient(address, self._caches, self._regs, self._layout,
                                                         options=self.config.pipe_options(),
                                                         group_layers=self._group_layers)
            return c

    def load(self, spec: LoadSpec, reads: Sequence[tuple[str, Optional[HeadRead], int]]) -> int:
        """GET ``spec``'s blocks (every KV cache group) from every read; returns bytes loaded.
        Raises :class:`KVTransferError`."""
        nbytes = 0
        stall = None
        if spec.stall_after_claim_s > 0:  # testing only: a slow decode that already holds the lease
            stall = lambda: time.sleep(spec.stall_after_claim_s)  # noqa: E731
        for address, rd, readers in reads:
            heads = None if rd is None else (rd.src_head, rd.num_heads, rd.dst_head)
            res = self._client(address).load(spec.remote_request_id, spec.token_ids, spec.block_ids,
                                             spec.skip_blocks, heads=heads, readers=readers, after_claim=stall,
                                             more_groups=spec.more_groups)
            if not res.ok:
                raise KVTransferError(f"rma read from {address}: {res.error}")
            nbytes += res.nbytes
        return nbytes

    def renew(self, remote_request_id: str, addresses: Sequence[str]) -> None:
        """Extend the lease of ``remote_request_id`` at each producer address; a lease already gone is logged."""
        for address in addresses:
            if remote_request_id in self._client(address).renew([remote_request_id]):
                continue
            if (address, remote_request_id) in self._gone:  # renewed again while the request is answered
                continue
            self._gone[(address, remote_request_id)] = None
            while len(self._gone) > 1024:
                self._gone.pop(next(iter(self._gone)))
            log.warning("prefill %s no longer holds %s: a load still to come fails and is recomputed, and "
                        "a failover to another decode would recompute too", address, remote_request_id)

    def ack(self, remote_request_id: str, addresses: Sequence[str]) -> None:
        """Tell each producer address that ``remote_request_id`` was answered in full (retained blocks go)."""
        for address in addresses:
            if remote_request_id not in self._client(address).ack([remote_request_id]):
                log.info("prefill %s no longer held %s when it was acknowledged (lease ended)", address,
                         remote_request_id)

    def shutdown(self) -> None:
        """Close clients, the server (freeing its leases) and the registrations (idempotent)."""
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
            regs, self._owned_regs, self._regs = self._owned_regs, [], []
        for c in clients:
            c.close()
        if self.server is not None:
            self.server.close()
            self.server = None
        for r in regs:
            r.close()

