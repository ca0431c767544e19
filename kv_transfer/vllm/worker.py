"""The connector's worker half: one per worker rank; stages saves on prefill, loads on decode, through the connector core.

Prefill: :meth:`UcxWorker.wait_for_save` stages each request the scheduler
named (:class:`~kv_transfer.KVProducer` gathers its blocks into the rank's
:class:`~kv_transfer.LookupBuffer`, served on the rank's own port
``rank_port(kv_port, tp_rank, tp_size, dp_index=dp)``: ``kv_port`` itself for
TP 1 / DP 0, ``kv_port + dp*tp + tp_rank`` otherwise).

Tensor parallelism: decode rank ``r`` of TP ``D`` reads what
:func:`~kv_transfer.tp_mapping.decode_reads` says for prefill TP ``P``
(``remote_tp_size``) and the model's total KV heads: with ``P == D`` the whole
shard of prefill rank ``r`` (the plain block path); otherwise a head range of
each prefill rank it reads, cut by the prefill server (only those bytes cross
the wire) and written at its head offset (:meth:`KVConsumer.load_heads`). An
entry read by several decode ranks (``D > P``) is shared between that many
fetches (``readers``) and dropped after the last. A read that fails fails the
whole request on this rank (every block reported), so vLLM recomputes it.

Decode: :meth:`UcxWorker.start_load_kv` hands each load to a background thread
that goes through :class:`~kv_transfer.KVConsumer` (the same validation as any
other consumer) with one redialling :class:`~kv_transfer.LookupClient` per
producer address, then reports the request in ``finished_recving`` and any
block that did not arrive through ``get_block_ids_with_load_errors`` (vLLM then
applies ``kv_load_failure_policy``).

Per-rank state lives here and only here (:class:`RankInfo`, the caches, the
buffer and server, the clients): tensor/data parallelism adds per-rank
endpoints and head slicing to this class, not to the scheduler.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import torch

import transport

from ..connector import KVConsumer, KVProducer, KVRequest
from ..errors import BufferFullError, KVTransferError
from ..integrity import flip_one_byte
from ..lookup_client import LookupClient
from ..lookup_server import LookupServer
from ..lookup_store import LookupBuffer
from ..paged import PagedLayout, gather_blocks, scatter_blocks
from ..tp_mapping import HeadRead, decode_reads, rank_port, readers_per_prefill_rank
from .config import UcxConfig
from .groups import KVGroup, group_entry_id
from .metadata import LoadSpec, UcxConnectorMetadata
from .rma_worker import RmaTransfer, choose_kv_mode
from .stats import TransferCounters, UcxKVConnectorStats

log = logging.getLogger(__name__)

__all__ = ["UcxWorker", "RankInfo"]


@dataclass(frozen=True)
class RankInfo:
    """Where this worker sits in its instance (tensor- and data-parallel rank and size)."""

    tp_rank: int = 0
    tp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1

    @classmethod
    def from_vllm(cls, vllm_config: Any) -> "RankInfo":
        """This process's ranks; rank 0 of size 1 where vLLM's groups are not set up (scheduler, tests)."""
        pc = vllm_config.parallel_config
        tp_rank = 0
        try:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            tp_rank = int(get_tensor_model_parallel_rank())
        except Exception:  # noqa: BLE001 - no TP group in this process
            pass
        # data_parallel_index: the engine's DP index even where vLLM runs non-MoE DP engines as DP 1
        dp = getattr(pc, "data_parallel_index", None)
        if dp is None:
            dp = getattr(pc, "data_parallel_rank", 0)
        return cls(tp_rank=tp_rank, tp_size=int(getattr(pc, "tensor_parallel_size", 1) or 1),
                   dp_rank=int(dp or 0),
                   dp_size=int(getattr(pc, "data_parallel_size", 1) or 1))


def _layout_of(cache: torch.Tensor, block_dim: int, name: Optional[str]) -> PagedLayout:
    """The layout of vLLM's per-layer cache: a preset naming the head dim where the shape is one vLLM uses."""
    if cache.dim() == 4 and block_dim == 0 and cache.device.type == "cpu":
        return PagedLayout.vllm_cpu()  # (blocks, kv_heads, block_size, 2 * head_size)
    if cache.dim() == 5 and block_dim == 1:
        return PagedLayout.flash_attn()  # (2, blocks, block_size, kv_heads, head_size)
    return PagedLayout(name=name or f"block_dim{block_dim}", block_dim=block_dim)


def _warm_up_transport() -> None:
    try:
        transport.warm_up()
    except Exception as exc:  # noqa: BLE001 - the first load will report the real error
        log.debug("transport warm-up failed: %s", exc)


class UcxWorker:
    """Worker-side state of one connector (one worker rank).

    Args:
        config: The connector's settings.
        rank: This worker's place in the instance.
        num_blocks: Blocks per layer cache, when vLLM's kv_cache_config says (finds the block dimension).
        layout_name: vLLM's KV cache layout name, if known.
        groups: The KV cache groups moved (see :mod:`.groups`); None: one group of every registered layer.
            Each group's blocks are staged and fetched as their own entry, over that group's layers.
    """

    def __init__(self, config: UcxConfig, rank: RankInfo, *, num_blocks: Optional[int] = None,
                 layout_name: Optional[str] = None, groups: Optional[list[KVGroup]] = None):
        self.config = config
        self.rank = rank
        self._groups = groups or [KVGroup(0, (), config.block_size)]
        self._group_caches: list[list[torch.Tensor]] = []  # per group: its layers' caches, in registration order
        self._group_block_bytes: list[int] = []  # per group: one block, all its layers
        self._num_blocks = num_blocks
        self._layout_name = layout_name
        if config.ucx_tls:
            os.environ["UCX_TLS"] = config.ucx_tls
        self._caches: list[torch.Tensor] = []
        self._layout: Optional[PagedLayout] = None
        self._block_bytes = 0  # one block, all layers
        self._buffer: Optional[LookupBuffer] = None
        self._producers: list[KVProducer] = []  # one per group
        self._server: Optional[LookupServer] = None
        self._consumers: dict[str, list[KVConsumer]] = {}  # producer address -> one consumer per group, one client
        self._pool: Optional[ThreadPoolExecutor] = None
        self._lock = threading.Lock()
        self._done_recv: set[str] = set()
        self._done_send: set[str] = set()
        self._failed_blocks: set[int] = set()
        self._failed_reqs: set[str] = set()  # several KV cache groups: failures go by request (see get_finished)
        self._cancelled: set[str] = set()
        self.counters = TransferCounters()
        self.kv_mode = choose_kv_mode(config)[0] if config.is_producer else "stage"  # what this producer serves
        self._rma: Optional[RmaTransfer] = None  # rma mode (producer) or rma loads (consumer)

    # ------------------------------------------------------------------ setup
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Adopt vLLM's per-layer caches; a producer starts serving, a consumer warms UCX up."""
        self._group_caches = self._split_groups(kv_caches)
        self._caches = self._group_caches[0]
        first = self._caches[0]
        num_blocks = self._num_blocks or first.shape[0]
        block_dim = 0 if first.shape[0] == num_blocks else next(
            (d for d, s in enumerate(first.shape) if s == num_blocks), 0)
        self._layout = _layout_of(first, block_dim, self._layout_name)
        name = self._layout.name
        self._group_block_bytes = [sum(self._layout.block_nbytes(c) for c in caches) for caches in self._group_caches]
        self._block_bytes = self._group_block_bytes[0]
        log.info("UcxConnector worker tp %d/%d dp %d/%d: %s layers, per-layer cache %s %s, layout %s (block dim %d)",
                 self.rank.tp_rank, self.rank.tp_size, self.rank.dp_rank, self.rank.dp_size,
                 "+".join(f"{len(c)} {g.kind()}" for g, c in zip(self._groups, self._group_caches)),
                 tuple(first.shape), first.dtype, name, block_dim)
        if self.config.is_producer or self.config.is_consumer:
            self._rma = RmaTransfer(self.config, [c for caches in self._group_caches for c in caches], self._layout,
                                    self._sent, group_layers=[len(caches) for caches in self._group_caches])
        if self.config.is_producer and self.kv_mode == "rma":
            port = rank_port(self.config.kv_port, self.rank.tp_rank, self.rank.tp_size, dp_index=self.rank.dp_rank)
            log.info("UcxConnector producer (tp %d/%d dp %d) leasing KV blocks in place (kv_mode rma) on %s",
                     self.rank.tp_rank, self.rank.tp_size, self.rank.dp_rank, self._rma.serve(self.config.kv_host, port))
        elif self.config.is_producer:
            self._buffer = LookupBuffer(self.config.buffer_bytes, lease_s=self.config.lease_s)
            self._producers = [KVProducer(self._buffer, caches, self._layout,
                                          insert_timeout_s=self.config.insert_timeout_s, lease_s=self.config.lease_s,
                                          checksum=self.config.verify_kv, retain=self.config.retain_kv)
                               for caches in self._group_caches]
            port = rank_port(self.config.kv_port, self.rank.tp_rank, self.rank.tp_size, dp_index=self.rank.dp_rank)
            self._server = self._buffer.serve(self.config.kv_host, port)
            log.info("UcxConnector producer (tp %d/%d dp %d) serving KV on %s", self.rank.tp_rank,
                     self.rank.tp_size, self.rank.dp_rank, self._server.address)
        if self.config.is_consumer:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ucxkv-load")
            self._pool.submit(_warm_up_transport)  # UCX init takes ~0.5 s: not on the first request's path

    def _split_groups(self, kv_caches: dict[str, torch.Tensor]) -> list[list[torch.Tensor]]:
        """Each group's layer caches, in vLLM's registration order (every layer for a group without names)."""
        if not kv_caches:
            raise KVTransferError("register_kv_caches: vLLM registered no KV cache layer")
        out = []
        for g in self._groups:
            if not g.layer_names:
                out.append(list(kv_caches.values()))
                continue
            missing = [n for n in g.layer_names if n not in kv_caches]
            if missing:
                raise KVTransferError(f"KV cache group {g.index} ({g.kind()}) names layers vLLM did not register: "
                                      f"{missing[:3]} (registered: {list(kv_caches)[:3]}...)")
            names = set(g.layer_names)
            out.append([t for n, t in kv_caches.items() if n in names])
        return out

    # ------------------------------------------------------------------- load
    def start_load_kv(self, meta: UcxConnectorMetadata) -> None:
        """Note this step's cancellations and start its loads in the background (returns at once)."""
        if self._pool is None:
            return
        with self._lock:
            self._cancelled.update(meta.cancel_loads)
        for spec in meta.to_load:
            self._pool.submit(self._load, spec)
        if meta.renew_leases:
            self._pool.submit(self._renew, meta.renew_leases)
        if meta.ack_loads:
            self._pool.submit(self._acknowledge, meta.ack_loads)

    def _acknowledge(self, specs: list) -> None:
        """Requests answered in full: prefill may drop the KV it retained for a failover (failures are
        logged only: the entry then goes when its lease ends)."""
        for spec in specs:
            if spec.kv_mode == "rma":
                try:
                    self._rma.ack(spec.remote_request_id, [a for a, _, _ in self._reads(spec)])
                except Exception as exc:  # noqa: BLE001 - the lease bounds what is left behind
                    log.warning("acknowledging %s to prefill %s failed (its lease will free the blocks): %s",
                                spec.remote_request_id, spec.remote_address, exc)
                continue
            for address, _, _ in self._reads(spec):
                try:
                    for pos in range(len(self._group_caches)):  # one retained entry per KV cache group
                        self._consumer(address, pos).abort(group_entry_id(spec.remote_request_id, pos), num_layers=0)
                except Exception as exc:  # noqa: BLE001 - the lease bounds what is left behind
                    log.warning("acknowledging %s to prefill %s failed (its lease will drop it): %s",
                                spec.remote_request_id, address, exc)

    def _renew(self, specs: list) -> None:
        """rma: extend prefill's leases of requests still waiting here for blocks, or (retained) still being
        answered here (failures are logged only)."""
        for spec in specs:
            try:
                self._rma.renew(spec.remote_request_id, [a for a, _, _ in self._reads(spec)])
            except Exception as exc:  # noqa: BLE001 - the load itself will report what is wrong
                log.warning("renewing prefill's lease of %s at %s failed: %s", spec.remote_request_id,
                            spec.remote_address, exc)

    def _sent(self, req_id: str) -> None:
        """rma producer: the request's leased blocks may be freed (reported in finished_sending)."""
        with self._lock:
            self._done_send.add(req_id)

    def _consumer(self, address: str, group: int = 0) -> KVConsumer:
        """The consumer of ``group``'s layers reading from ``address`` (all groups share one client)."""
        cs = self._consumers.get(address)
        if cs is None:
            client = LookupClient(address, options=self.config.pipe_options(self._caches[0].device), redial=True)
            cs = [KVConsumer(client, caches, self._layout, wait_s=0.0, verify=self.config.verify_kv)
                  for caches in self._group_caches]
            self._consumers[address] = cs
        return cs[group]

    def _perturb(self, spec: LoadSpec) -> None:
        """Testing only: add noise to the blocks loaded for ``spec``, every group (proves decode uses them)."""
        for caches, (ids, skip) in zip(self._group_caches, spec.groups()):
            if ids[skip:]:
                staged = gather_blocks(caches, self._layout, ids[skip:])
                scatter_blocks(caches, self._layout, ids[skip:], staged + torch.randn_like(staged))

    def _reads(self, spec: LoadSpec) -> list[tuple[str, Optional[HeadRead], int]]:
        """(producer address, head read or None for the whole shard, readers sharing the entry) per read."""
        host, _, port = spec.remote_address.rpartition(":")
        base, p, d = int(port), spec.remote_tp_size, self.rank.tp_size
        if p == d or spec.total_kv_heads <= 0:
            return [(f"{host}:{base + (self.rank.tp_rank if p == d else 0)}", None, 1)]
        readers = readers_per_prefill_rank(p, d, spec.total_kv_heads)
        return [(f"{host}:{base + rd.prefill_rank}", rd, readers[rd.prefill_rank])
                for rd in decode_reads(p, d, spec.total_kv_heads, self.rank.tp_rank)]

    def _load(self, spec: LoadSpec) -> None:
        t0 = time.monotonic()
        groups = spec.groups()
        failed = [b for ids, skip in groups for b in ids[skip:]]
        loaded_bytes, ok, cause = 0, False, "other"
        where = spec.remote_address
        try:
            reads = self._reads(spec)
            where = ", ".join(a for a, _, _ in reads)
            with self._lock:
                cancelled = spec.req_id in self._cancelled
            if cancelled:
                # an rma lease just runs out; retained KV stays for a decode the proxy retries on
                for address, _, _ in ([] if spec.kv_mode == "rma" or spec.retain else reads):
                    for pos in range(len(groups)):
                        self._consumer(address, pos).abort(group_entry_id(spec.remote_request_id, pos), num_layers=0)
                raise KVTransferError("request aborted before its KV was fetched")
            if spec.kv_mode == "rma":
                reads, loaded_bytes = [], self._rma.load(spec, reads)
            for pos, (ids, skip) in enumerate(groups):  # one entry per KV cache group (hybrid models: several)
                req = KVRequest(group_entry_id(spec.remote_request_id, pos), spec.token_ids, ids, skip_blocks=skip)
                loaded = 0
                for address, rd, n_readers in reads:
                    consumer = self._consumer(address, pos)
                    if rd is None:
                        res = consumer.load([req])[req.request_id]
                    else:
                        res = consumer.load_heads(req, rd.src_head, rd.num_heads, rd.dst_head, readers=n_readers)
                    if len(reads) == 1 and len(groups) == 1:
                        failed = res.failed_block_ids
                    loaded, cause = len(res.loaded_block_ids), res.cause
                    if not res.ok:  # a block missing some heads is as bad as a missing block: all of them failed
                        raise KVTransferError(f"producer {address}"
                                              f"{f' (KV cache group {pos})' if len(groups) > 1 else ''}: {res.error}")
                loaded_bytes += loaded * self._group_block_bytes[pos]
            if loaded_bytes and spec.perturb and spec.perturb_rank in (None, self.rank.tp_rank):
                self._perturb(spec)
            ok, failed = True, []
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reported load error
            log.error("KV load for %s (tp rank %d/%d) from %s failed (%d blocks not loaded): %s", spec.req_id,
                      self.rank.tp_rank, self.rank.tp_size, where, len(failed), exc)
        if not ok:
            self.counters.record_failure("load", cause)
        else:
            self.counters.record_load(time.monotonic() - t0, loaded_bytes)
        with self._lock:
            if not ok and len(self._group_caches) > 1:
                self._failed_reqs.add(spec.req_id)  # block ids are only unique within a group: vLLM wants the request
            else:
                self._failed_blocks.update(failed)
            if spec.req_id in self._cancelled:
                self._cancelled.discard(spec.req_id)
                self._done_send.add(spec.req_id)  # frees the blocks held for an aborted request
            self._done_recv.add(spec.req_id)

    # ------------------------------------------------------------------- save
    def wait_for_save(self, meta: UcxConnectorMetadata) -> None:
        """Stage every request the scheduler named in this step, one entry per KV cache group (blocks while full)."""
        if self._rma is not None and self._rma.server is not None:
            self._rma.offer(meta.to_save)
            self._rma.release(meta.release_leases)
            self.counters.add(requests_saved=len(meta.to_save))
            return
        if not self._producers:
            return
        for spec in meta.to_save:
            t0 = time.monotonic()
            tamper = flip_one_byte() if spec.corrupt or self.config.corrupt else None
            nbytes, done = 0, 0
            try:
                for pos, (producer, ids) in enumerate(zip(self._producers, spec.groups())):
                    producer.save([KVRequest(group_entry_id(spec.req_id, pos), spec.token_ids, ids)], tamper=tamper)
                    nbytes += len(ids) * self._group_block_bytes[pos]
                    done += 1
            except Exception as exc:  # noqa: BLE001 - decode will see "no KV" and apply its policy
                log.error("saving KV of %s failed: %s", spec.req_id, exc)
                for pos in range(done):  # a request with a group missing is useless: free what was staged
                    self._producers[pos].abort(group_entry_id(spec.req_id, pos))
                self.counters.record_failure("save", "buffer_full" if isinstance(exc, BufferFullError) else "other")
                continue
            self.counters.record_save(time.monotonic() - t0, nbytes)

    # ----------------------------------------------------------------- report
    def get_finished(self) -> tuple[set[str] | None, set[str] | None]:
        """(requests whose held blocks may be freed, requests whose load ended) since the last call."""
        send, recv, _ = self.get_finished_and_failed()
        return (send or None), (recv or None)

    def get_finished_and_failed(self) -> tuple[set[str], set[str], set[str]]:
        """(held blocks may be freed, load ended, load failed) since the last call, taken together.

        With several KV cache groups a failed load is reported by request id (vLLM's
        ``failed_recving``; it refuses block ids then, which are unique only within a
        group); each failed request is also in the second set, in the same call.
        """
        with self._lock:
            recv, self._done_recv = self._done_recv, set()
            send, self._done_send = self._done_send, set()
            failed, self._failed_reqs = self._failed_reqs, set()
        return send, recv, failed

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Blocks whose load failed since the last call."""
        with self._lock:
            bad, self._failed_blocks = self._failed_blocks, set()
        return bad

    def get_kv_connector_stats(self) -> Optional[UcxKVConnectorStats]:
        """This interval's counters (None when nothing happened); a producer adds its buffer's occupancy."""
        if self._buffer is not None:
            st = self._buffer.stats()
            self.counters.set_gauges(f"tp{self.rank.tp_rank}", staged_bytes=st["bytes_used"],
                                     staged_entries=st["num_entries"])
        server = self._rma.server if self._rma is not None else None
        if server is not None:
            self.counters.set_gauges(f"tp{self.rank.tp_rank}", leased_bytes=server.leased_bytes,
                                     leased_entries=server.num_leases)
        return self.counters.take()

    def shutdown(self) -> None:
        """Stop loading, close clients, server and buffer (idempotent)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        consumers, self._consumers = self._consumers, {}
        for cs in consumers.values():
            cs[0].source.close()  # the groups' consumers share this client
        if self._rma is not None:
            self._rma.shutdown()
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None
