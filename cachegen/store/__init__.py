"""The KV store: one synchronous interface over disk, memory, Redis/Valkey and the remote gRPC service.

``open_store(url)`` returns a ``KVStore``; the gRPC client classes are importable from here as well but load grpc
only when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cachegen.store.backends import (
    DEFAULT_CAPACITY_BYTES,
    ChunkInfo,
    KVStore,
    StoreStats,
    TenantStore,
    open_store,
)
from cachegen.store.disk import DiskBackend
from cachegen.store.memory import MemoryBackend

if TYPE_CHECKING:
    from cachegen.store.client import ClientOptions, FetchStream, StoreClient
    from cachegen.store.client_async import AsyncFetchStream, AsyncStoreClient
    from cachegen.store.wire import FetchedChunk

_LAZY = {
    "StoreClient": "cachegen.store.client",
    "ClientOptions": "cachegen.store.client",
    "FetchStream": "cachegen.store.client",
    "AsyncStoreClient": "cachegen.store.client_async",
    "AsyncFetchStream": "cachegen.store.client_async",
    "FetchedChunk": "cachegen.store.wire",
}

__all__ = [
    "DEFAULT_CAPACITY_BYTES",
    "AsyncFetchStream",
    "AsyncStoreClient",
    "ChunkInfo",
    "ClientOptions",
    "DiskBackend",
    "FetchStream",
    "FetchedChunk",
    "KVStore",
    "MemoryBackend",
    "StoreClient",
    "StoreStats",
    "TenantStore",
    "open_store",
]


def __getattr__(name: str) -> Any:
    """Load the gRPC client (and grpc itself) only when a caller asks for it."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
