"""The connector's settings, read once from vLLM's ``kv_transfer_config`` into a frozen record.

Configuration (``kv_connector_extra_config``), with defaults:

``kv_host`` ("127.0.0.1")  address prefill's KV server binds to: one of this host's
  addresses, or 0.0.0.0 / :: for all (a non-local one is refused at startup); anything but
  loopback needs ``UCXKV_AUTH`` in the environment (secret or curve, or an explicit none;
  docs/reliability.md), else the KV server refuses to start;
``kv_advertise_host`` (see below)  the address put in kv_transfer_params for decode to dial;
``kv_advertise_interface`` (unset)  advertise this interface's address instead (e.g. "eth0",
  "ib0"); an unknown interface or one without an address is refused at startup;
  without either: kv_host, or when kv_host is a wildcard the address of the interface
  holding the default route (else the first non-loopback one). A loopback kv_host with a
  non-loopback advertised address (or the reverse) is refused: decode could not connect;
``kv_port`` (the config's ``kv_port``, 14579)  prefill's KV server port;
``kv_buffer_size`` (2 GiB)  staging capacity on prefill (back-pressure past it);
``kv_mode`` ("stage")  ``stage``: prefill copies a finished request's KV into a staging buffer
  (``kv_buffer_size``) and decode fetches it; ``rma``: nothing is staged, decode GETs
  prefill's blocks in place while prefill keeps them leased; ``auto``: per transport family
  (TCP only, or not) as the bench measured, today ``rma`` for both (see :mod:`.rma_worker`;
  the choice and why are logged). Prefill's choice travels to decode. Both modes move
  every KV cache group of a hybrid model;
``lease_s`` (30)  how long prefill keeps an unclaimed request's KV (staged bytes, or in
  rma mode its blocks, which vLLM cannot reuse meanwhile);
``retain_kv`` (false)  prefill: keep a request's KV after decode read it, until decode's request
  completes (decode then acknowledges it, which frees it) or its lease ends, so a second decode
  can load it when the first died or was cut off mid-answer (decode failover through
  ``ucxkv-proxy``, docs/operations.md). Stage mode: the staged entry stays at most ``lease_s``
  after the save (staging memory). rma mode: the leased blocks stay while the decode answering
  the request renews the lease (every ``lease_s / 3``), and at most ``lease_s`` after that decode
  died or stopped renewing (KV cache blocks vLLM cannot reuse meanwhile). Off, a fetch (stage) or
  decode's Done or death (rma) frees the KV;
``insert_timeout_s`` (10)  how long a full buffer may block a save;
``fetch_timeout_s`` (30)  bound on one fetch on decode;
``ucx_tls`` (unset)  sets ``UCX_TLS`` for the worker process;
``verify_kv`` (false)  prefill stores a per-block checksum with each staged entry and decode
  checks it before using the KV; a mismatch (or, with verify_kv on at decode, an entry
  without checksum) is a load error and the request is recomputed (see
  :mod:`kv_transfer.integrity`); turn it on on both sides together. Off by default: on CPU
  it costs more than 2 % of kv_bw (docs/bench.md, "Integrity cost");
``debug_perturb_loaded_kv`` (false)  testing only: add noise to loaded KV (also per
  request with ``"ucxkv_debug_perturb": true`` in its kv_transfer_params);
``debug_corrupt_staged_kv`` (false)  testing only, prefill: flip one bit of every staged entry
  after its checksum (also per request with ``"ucxkv_debug_corrupt": true`` in the prefill
  request's kv_transfer_params);
``"ucxkv_debug_stall_after_claim_s": S`` (per decode request, kv_transfer_params only)  testing
  only, rma: decode sleeps S seconds after claiming prefill's lease, before its GETs (a slow
  or dying decode that holds the lease).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from transport import PipeOptions

from .._serving import KV_PIPE_OPTIONS
from .addresses import resolve_advertise_host

__all__ = ["UcxConfig"]


def _flag(v: Any) -> bool:
    """A boolean setting given as a bool, a number or a string ("false", "0", "off", "no" are False)."""
    if isinstance(v, str):
        return v.strip().lower() not in ("false", "0", "off", "no", "")
    return bool(v)


@dataclass(frozen=True)
class UcxConfig:
    """Every setting of one connector instance (both roles read the same record)."""

    is_producer: bool
    is_consumer: bool
    kv_host: str = "127.0.0.1"
    kv_port: int = 14579
    advertise_host: str = "127.0.0.1"
    block_size: int = 16
    buffer_bytes: int = 2 << 30
    lease_s: float = 30.0
    insert_timeout_s: float = 10.0
    fetch_timeout_s: float = 30.0
    ucx_tls: Optional[str] = None
    perturb: bool = False
    kv_mode: str = "stage"
    verify_kv: bool = False
    corrupt: bool = False
    retain_kv: bool = False
    num_groups: int = 1  # KV cache groups moved (hybrid models with vLLM's hybrid allocator: more than one)

    def pipe_options(self, device: Any = None) -> PipeOptions:
        """The options of every pipe this connector opens: one exchange bounded by ``fetch_timeout_s``,
        received tensors landing on ``device`` (None: the package default)."""
        return KV_PIPE_OPTIONS.replace(timeout_s=self.fetch_timeout_s, device=device)

    @classmethod
    def from_vllm(cls, vllm_config: Any, num_groups: int = 1) -> "UcxConfig":
        """Read ``vllm_config.kv_transfer_config``; a producer's advertised address is checked here.

        ``num_groups``: the KV cache groups the connector moves (see :mod:`.groups`).

        Raises :class:`~kv_transfer.KVTransferError` for an address decode could not reach
        (see :func:`~kv_transfer.vllm.addresses.resolve_advertise_host`).
        """
        tc = vllm_config.kv_transfer_config
        get = tc.get_from_extra_config
        is_producer = bool(tc.is_kv_producer)
        kv_host = str(get("kv_host", "127.0.0.1"))
        adv = get("kv_advertise_host", None)
        if is_producer:  # a consumer's kv_host names the (remote) prefill node: nothing to check
            advertise = resolve_advertise_host(kv_host, adv, get("kv_advertise_interface", None))
        else:
            advertise = str(adv) if adv else kv_host
        tls = get("ucx_tls", None)
        return cls(
            is_producer=is_producer,
            is_consumer=bool(tc.is_kv_consumer),
            kv_host=kv_host,
            kv_port=int(get("kv_port", tc.kv_port)),
            advertise_host=advertise,
            block_size=int(vllm_config.cache_config.block_size),
            buffer_bytes=int(float(get("kv_buffer_size", 2 << 30))),
            lease_s=float(get("lease_s", 30.0)),
            insert_timeout_s=float(get("insert_timeout_s", 10.0)),
            fetch_timeout_s=float(get("fetch_timeout_s", 30.0)),
            ucx_tls=str(tls) if tls else None,
            perturb=bool(get("debug_perturb_loaded_kv", False)),
            kv_mode=str(get("kv_mode", "stage")),
            verify_kv=_flag(get("verify_kv", False)),
            corrupt=_flag(get("debug_corrupt_staged_kv", False)),
            retain_kv=_flag(get("retain_kv", False)),
            num_groups=int(num_groups),
        )
