"""vLLM plugin entry point: registers ``UcxConnector`` by name in every vLLM process.

Installed through ``[project.entry-points."vllm.general_plugins"]``; afterwards
``--kv-transfer-config '{"kv_connector":"UcxConnector","kv_role":...}'`` works with no
``kv_connector_module_path``.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

CONNECTOR_NAME = "UcxConnector"


def register() -> None:
    """Register the connector with vLLM's factory (idempotent; vLLM calls this once per process)."""
    try:
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    except ImportError:  # vLLM absent: nothing to register
        return
    if CONNECTOR_NAME in getattr(KVConnectorFactory, "_registry", {}):
        return
    KVConnectorFactory.register_connector(CONNECTOR_NAME, "kv_transfer.vllm.connector", "UcxConnector")
    log.debug("registered %s with vLLM", CONNECTOR_NAME)
