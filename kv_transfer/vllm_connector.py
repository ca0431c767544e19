"""Compatibility re-export: ``kv_connector_module_path: kv_transfer.vllm_connector`` keeps working (code in kv_transfer.vllm)."""

from .vllm import (
    UcxConnector,
    UcxConnectorMetadata,
    UcxKVConnectorStats,
    local_addresses,
    resolve_advertise_host,
)

__all__ = ["UcxConnector", "UcxConnectorMetadata", "UcxKVConnectorStats", "resolve_advertise_host",
           "local_addresses"]
