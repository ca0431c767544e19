"""Compatibility re-export: the LookupBuffer and its server and clients, now in lookup_store/_server/_client."""

from .lookup_client import LookupClient, MultiProducerClient
from .lookup_server import LookupServer
from .lookup_source import KVSource, Match, Part
from .lookup_store import LookupBuffer

__all__ = ["LookupBuffer", "Match", "LookupServer", "LookupClient", "MultiProducerClient", "Part", "KVSource"]
