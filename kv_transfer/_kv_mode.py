"""The ``kv_mode`` rule: ``stage`` or ``rma`` for a set of UCX transports, and the measurement behind it.

Shared by the vLLM connector (:func:`kv_transfer.vllm.rma_worker.choose_kv_mode`) and the
bench (``ucxkv-perftest -t kv_bw --kv-mode auto``), so what the bench measures for ``auto``
is what the connector does. Reads only ``UCX_TLS``: every process of an instance decides alike.
"""

from __future__ import annotations

__all__ = ["KV_MODES", "AUTO_TABLE", "transport_family", "auto_kv_mode"]

KV_MODES = ("stage", "rma", "auto")

#: What ``auto`` picks per UCX transport family, and the measurement behind it (docs/bench.md,
#: "kv_mode: rma vs stage": kv_bw, 256 MiB Llama-3-8B-shaped request, stage = --kv-mode gather,
#: each pair run back to back on the shared 2-core box, 1-minute load average 1-8).
AUTO_TABLE = {
    "sm": ("rma", "rma ahead of stage in 5 of 5 paired runs over shared memory (rma 493-3751 MB/s, "
                  "stage 103-446 MB/s), and no staging memory"),
    "tcp": ("rma", "rma ahead of stage in 5 of 5 paired runs over TCP (rma 530-1248 MB/s, "
                   "stage 199-716 MB/s), and no staging memory"),
}


def transport_family(tls: str) -> str:
    """``tcp`` when ``UCX_TLS`` names only TCP (GET is emulated by the owner), else ``sm``
    (unset, shared memory, RDMA: a native or zero-copy GET is available)."""
    names = {t.strip() for t in tls.split(",") if t.strip()}
    return "tcp" if names and names <= {"tcp", "self"} else "sm"


def auto_kv_mode(tls: str) -> tuple[str, str]:
    """(``stage`` or ``rma``, why) that ``kv_mode auto`` picks for ``UCX_TLS`` value ``tls``."""
    choice, measured = AUTO_TABLE[transport_family(tls)]
    return choice, f"auto: UCX_TLS={tls or '(unset)'} -> {choice} ({measured})"
