"""The storage interface every KV store backend implements, and ``open_store``.

A backend holds opaque payloads (coded chunks) under ``ChunkKey``s. All levels of one chunk share the key's
``group``; ``lookup`` walks a prompt's chain of chunk keys and reports the leading run of chunks that are held.
Backends are synchronous and thread-safe; the gRPC service and the async client wrap them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable
from urllib.parse import parse_qs, urlsplit

from cachegen.errors import InvalidRequest
from cachegen.spec import ChunkKey

DEFAULT_CAPACITY_BYTES = 8 << 30
DEFAULT_NAMESPACE = "default"
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """What is held for one chunk: level id -> payload size in bytes."""

    levels: dict[int, int]


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Counters of one store. Sizes cover the whole backend; hits/misses count ``get`` calls of this process."""

    backend: str
    num_chunks: int
    num_payloads: int
    size_bytes: int
    capacity_bytes: int
    hits: int
    misses: int
    evictions: int


@runtime_checkable
class KVStore(Protocol):
    """A synchronous chunk store: local (disk, memory, Redis) or remote (gRPC client)."""

    def put(self, key: ChunkKey, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically: no reader ever sees half a payload."""

    def get(self, key: ChunkKey) -> bytes:
        """The payload under ``key``; raises ChunkNotFound, StoreUnavailable, or FormatError when corrupted."""

    def lookup(self, keys: Sequence[ChunkKey]) -> list[ChunkInfo]:
        """One ChunkInfo per leading chunk of ``keys`` with at least one level held (``level`` is ignored)."""

    def delete(self, key: ChunkKey) -> int:
        """Remove every level of the chunk of ``key``; returns the number of payloads removed."""

    def stats(self) -> StoreStats: ...

    def close(self) -> None: ...


@runtime_checkable
class TenantStore(KVStore, Protocol):
    """A backend that can hand out views under per-tenant namespaces (what the gRPC service serves from)."""

    def namespaced(self, namespace: str) -> KVStore:
        """A view of the same storage whose keys live under ``namespace``; views share capacity."""


def check_namespace(namespace: str) -> str:
    """A tenant namespace becomes a directory or key prefix: only a short, plain name is accepted."""
    if not _NAMESPACE_RE.fullmatch(namespace):
        raise InvalidRequest(f"namespace must match {_NAMESPACE_RE.pattern}, got {namespace!r}")
    return namespace


def chunk_id(key: ChunkKey) -> tuple[bytes, bytes, bytes]:
    """Identity of a chunk regardless of level: model, layout and chained prefix hash."""
    return (key.model_id, key.layout_digest, key.prefix_hash)


def _query_float(query: dict[str, list[str]], name: str, url: str) -> float | None:
    if name not in query:
        return None
    try:
        return float(query[name][-1])
    except ValueError:
        raise InvalidRequest(f"store URL option {name} must be a number, got {query[name][-1]!r} in {url!r}") from None


def open_store(url: str, capacity_bytes: int = DEFAULT_CAPACITY_BYTES) -> KVStore:
    """Open a store by URL.

    ``disk:///abs/path[?ttl_s=S&fsync=0]``, ``memory://[?ttl_s=S]``, ``redis://host:port[/db]``,
    ``redis-cluster://host:port,host:port`` and ``grpc://host:port[?token=T]``. Options: ``ttl_s`` drops payloads
    written longer ago; ``fsync=0`` trades durability after power loss for put speed. Raises InvalidRequest.
    """
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    ttl_s = _query_float(query, "ttl_s", url)
    if parts.scheme == "memory":
        from cachegen.store.memory import MemoryBackend

        return MemoryBackend(capacity_bytes, ttl_s)
    if parts.scheme == "disk":
        from cachegen.store.disk import DiskBackend

        if parts.netloc or not parts.path.startswith("/"):
            raise InvalidRequest(f"disk store URL needs an absolute path (disk:///abs/path), got {url!r}")
        is_durable = query.get("fsync", ["1"])[-1] not in ("0", "false", "no")
        return DiskBackend(parts.path, capacity_bytes, ttl_s=ttl_s, is_durable=is_durable)
    if parts.scheme in ("redis", "redis-cluster"):
        from cachegen.store.redis_backend import open_redis

        return open_redis(url, ttl_s)
    if parts.scheme == "grpc":
        from cachegen.store.client import StoreClient

        return StoreClient.from_url(url)
    raise InvalidRequest(f"unknown store URL scheme {parts.scheme!r} in {url!r}")
