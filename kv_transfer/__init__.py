"""KV-cache transfer helpers for ucxkv: paged block movement, the LookupBuffer, the connector core."""

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
from .lookup_buffer import LookupBuffer, LookupClient, LookupServer, Match, MultiProducerClient
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
