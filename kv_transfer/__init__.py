"""ucxkv's KV layer: paged block movement, the LookupBuffer and its server/clients, the connector core.

The vLLM connector lives in :mod:`kv_transfer.vllm` (imported only by vLLM), the
HTTP proxy in :mod:`kv_transfer.proxy` (needs the ``proxy`` extra).
"""

from .connector import KVConsumer, KVProducer, KVRequest, LoadResult, layer_request_id
from .errors import (
    BufferFullError,
    EntryTooLargeError,
    KVTransferError,
    KVUsageError,
    LookupProtocolError,
    PeerUnavailableError,
    ProducerError,
    WireVersionError,
)
from .lookup_client import LookupClient, MultiProducerClient
from .lookup_server import LookupServer
from .lookup_source import KVSource, Match
from .lookup_store import LookupBuffer
from .paged import (
    BlockIds,
    PagedLayout,
    block_views,
    coalesce_runs,
    gather_blocks,
    matching_views,
    scatter_blocks,
    staging_shape,
)

__all__ = [
    # lookup buffer
    "LookupBuffer",
    "LookupServer",
    "LookupClient",
    "MultiProducerClient",
    "Match",
    "KVSource",
    # connector core
    "KVProducer",
    "KVConsumer",
    "KVRequest",
    "LoadResult",
    "layer_request_id",
    # paged caches
    "PagedLayout",
    "BlockIds",
    "staging_shape",
    "gather_blocks",
    "scatter_blocks",
    "coalesce_runs",
    "block_views",
    "matching_views",
    # errors
    "KVTransferError",
    "KVUsageError",
    "EntryTooLargeError",
    "BufferFullError",
    "LookupProtocolError",
    "WireVersionError",
    "ProducerError",
    "PeerUnavailableError",
]
