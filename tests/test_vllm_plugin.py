"""The connector is selectable by name once installed, and the compatibility check names both sides."""

from __future__ import annotations

import importlib.metadata

import pytest

pytest.importorskip("vllm")


def test_entry_point_registers_connector_by_name():
    eps = [ep for ep in importlib.metadata.entry_points(group="vllm.general_plugins") if ep.name == "ucxkv"]
    assert eps, "ucxkv's vllm.general_plugins entry point is not installed (pip install -e .)"
    register = eps[0].load()
    register()
    register()  # idempotent: vLLM may call it more than once per process
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    cfg = KVTransferConfig(kv_connector="UcxConnector", kv_role="kv_consumer")
    cls = KVConnectorFactory.get_connector_class(cfg)
    assert cls.__name__ == "UcxConnector" and cls.__module__ == "kv_transfer.vllm_connector"


def test_compatibility_mismatch_names_both_sides():
    from kv_transfer.vllm_connector import UcxConnector

    c = UcxConnector.__new__(UcxConnector)  # the check needs no engine
    c.compat = {"model": "m", "dtype": "torch.bfloat16", "num_layers": "32", "num_kv_heads": "8",
                "head_size": "128", "block_size": "16", "layout": "LBHNC"}
    assert c._compat_problem(dict(c.compat)) is None
    problem = c._compat_problem(dict(c.compat, num_kv_heads="4", block_size="32"))
    assert "num_kv_heads: prefill='4' decode='8'" in problem
    assert "block_size: prefill='32' decode='16'" in problem
    assert "no compatibility record" in c._compat_problem(None)
