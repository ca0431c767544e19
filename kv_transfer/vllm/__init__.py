"""vLLM's V1 KV connector for ucxkv, organised as vLLM's own connectors: facade, scheduler, worker, metadata, stats.

Import this package only where vLLM is installed. ``UcxConnector`` is what
``kv_connector`` names (the plugin registers it; ``kv_connector_module_path``
``kv_transfer.vllm`` or the older ``kv_transfer.vllm_connector`` both work).
"""

from .addresses import local_addresses, resolve_advertise_host
from .config import UcxConfig
from .connector import UcxConnector
from .metadata import CONNECTOR_PROTOCOL, LoadSpec, SaveSpec, UcxConnectorMetadata, compat_problem, compat_record
from .scheduler import UcxScheduler
from .stats import UcxKVConnectorStats
from .worker import RankInfo, UcxWorker

__all__ = ["UcxConnector", "UcxScheduler", "UcxWorker", "RankInfo", "UcxConfig", "UcxConnectorMetadata",
           "SaveSpec", "LoadSpec", "UcxKVConnectorStats", "CONNECTOR_PROTOCOL", "compat_record", "compat_problem",
           "resolve_advertise_host", "local_addresses"]
