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
    assert cls.__name__ == "UcxConnector" and cls.__module__ == "kv_transfer.vllm.connector"
    # the module path users already have in their configs still names the same class
    for path in ("kv_transfer.vllm_connector", "kv_transfer.vllm"):
        cfg = KVTransferConfig(kv_connector="UcxConnector", kv_role="kv_consumer", kv_connector_module_path=path)
        assert KVConnectorFactory.get_connector_class(cfg) is cls, path


def test_compatibility_mismatch_names_both_sides():
    from kv_transfer.vllm import CONNECTOR_PROTOCOL, compat_problem

    mine = {"protocol": str(CONNECTOR_PROTOCOL), "model": "m", "dtype": "torch.bfloat16", "num_layers": "32",
            "num_kv_heads": "8", "head_size": "128", "block_size": "16", "layout": "LBHNC",
            "kv_groups": "full/16,sliding4096/16"}
    assert compat_problem(mine, dict(mine)) is None
    # a hybrid prefill with its hybrid allocator off (one group) does not pair with one that has it on
    assert "kv_groups: prefill='full/32' decode='full/16,sliding4096/16'" in compat_problem(
        mine, dict(mine, kv_groups="full/32"))
    problem = compat_problem(mine, dict(mine, num_kv_heads="4", block_size="32"))
    assert "num_kv_heads: prefill='4' decode='8'" in problem
    assert "block_size: prefill='32' decode='16'" in problem
    assert "no compatibility record" in compat_problem(mine, None)
    # a prefill speaking another connector protocol is refused by name
    old = {k: v for k, v in mine.items() if k != "protocol"}
    assert f"protocol: prefill=None decode='{CONNECTOR_PROTOCOL}'" in compat_problem(mine, old)
