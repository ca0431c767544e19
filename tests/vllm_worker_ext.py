"""A vLLM worker extension for tests: each worker rank reports its connector's counters.

Start the server with ``--worker-extension-cls tests.vllm_worker_ext.UcxkvWorkerExtension``
and ``VLLM_SERVER_DEV_MODE=1``; ``VllmServer.rpc("ucxkv_totals")`` then returns one
dict per worker rank (vLLM's ``/collective_rpc`` dev endpoint).
"""

from __future__ import annotations


class UcxkvWorkerExtension:
    """Mixed into vLLM's worker class by ``--worker-extension-cls``."""

    def ucxkv_totals(self) -> dict:
        """This rank's connector counters since start, with its TP/DP rank."""
        from vllm.distributed.kv_transfer.kv_transfer_state import get_kv_transfer_group

        w = get_kv_transfer_group().worker
        return dict(w.counters.totals(), tp_rank=w.rank.tp_rank, dp_rank=w.rank.dp_rank)

    def ucxkv_leases(self) -> dict:
        """Requests this rank holds leased (kv_mode rma producer; 0 otherwise)."""
        from vllm.distributed.kv_transfer.kv_transfer_state import get_kv_transfer_group

        rma = get_kv_transfer_group().worker._rma
        return {"leases": rma.server.num_leases if rma is not None and rma.server is not None else 0}

    def ucxkv_pid(self) -> dict:
        """This worker's process id and TP rank (tests kill one rank)."""
        import os

        from vllm.distributed.kv_transfer.kv_transfer_state import get_kv_transfer_group

        return {"pid": os.getpid(), "tp_rank": get_kv_transfer_group().worker.rank.tp_rank}

    def ucxkv_kv_groups(self) -> dict:
        """The KV cache groups this rank's connector moves, and whether vLLM kept its hybrid allocator on."""
        from vllm.distributed.kv_transfer.kv_transfer_state import get_kv_transfer_group

        conn = get_kv_transfer_group()
        return {"kv_groups": conn.compat["kv_groups"],
                "hma": not self.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager}
