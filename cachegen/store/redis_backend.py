"""Redis/Valkey backend, single server (``redis://``) or cluster (``redis-cluster://h:p,h:p``).

Keys: ``cg:<namespace>:{<group>}:<tag>:<level>`` holds a payload framed like the disk backend's files (full key,
length, CRC-32, then the payload); ``cg:<namespace>:{<group>}:<tag>`` is a hash ``level -> payload size`` that
``lookup`` reads. The ``{group}`` hash tag puts all levels of a chunk and its index on one cluster slot, so one
node answers for the whole chunk and a put is one pipelined round trip: payload first, then its index entry.

Capacity and eviction belong to the server (``maxmemory`` with ``maxmemory-policy allkeys-lru``); an index entry
whose payload was evicted is dropped when a ``get`` misses it. TTLs use the servers' own key expiry.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from cachegen.errors import ChunkNotFound, FormatError, InvalidRequest, StoreUnavailable
from cachegen.spec import ChunkKey
from cachegen.store.backends import DEFAULT_NAMESPACE, ChunkInfo, StoreStats, check_namespace
from cachegen.store.disk import layout_tag
from cachegen.store.disk_files import frame_header, unframe

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_TIMEOUTS = {"socket_timeout": 5.0, "socket_connect_timeout": 1.0}


def _retry() -> Retry:
    return Retry(ExponentialBackoff(cap=0.5, base=0.02), retries=2)


@contextmanager
def _redis_errors(where: str) -> Iterator[None]:
    try:
        yield
    except redis.RedisError as exc:
        raise StoreUnavailable(f"redis store {where}: {type(exc).__name__}: {exc}") from exc


class _Counters:
    """Hits and misses of this process's gets (backend calls run in several threads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    def count(self, is_hit: bool) -> None:
        with self.lock:
            if is_hit:
                self.hits += 1
            else:
                self.misses += 1


class RedisBackend:
    """Chunks in Redis or Valkey; see the module docstring for keys, capacity and TTL."""

    def __init__(self, client: Any, where: str, ttl_s: float | None = None, namespace: str = DEFAULT_NAMESPACE):
        self._client = client
        self._where = where
        self._ttl_ms = int(ttl_s * 1000) if ttl_s else None
        self._ns = check_namespace(namespace)
        self._counters = _Counters()

    def namespaced(self, namespace: str) -> RedisBackend:
        """A view under another tenant's namespace, sharing the connection pool."""
        view = RedisBackend(self._client, self._where, None, namespace)
        view._ttl_ms, view._counters = self._ttl_ms, self._counters
        return view

    def _index_key(self, key: ChunkKey) -> str:
        return f"cg:{self._ns}:{{{key.group}}}:{layout_tag(key)}"

    def _payload_key(self, key: ChunkKey, level: int | None = None) -> str:
        return f"{self._index_key(key)}:{key.level if level is None else level}"

    def _run(self, fn: Callable[[], _T]) -> _T:
        with _redis_errors(self._where):
            return fn()

    def put(self, key: ChunkKey, data: bytes) -> None:
        index_key = self._index_key(key)
        pipe = self._client.pipeline(transaction=False)
        pipe.set(self._payload_key(key), frame_header(key, data) + data, px=self._ttl_ms)
        pipe.hset(index_key, str(key.level), len(data))
        if self._ttl_ms:
            pipe.pexpire(index_key, self._ttl_ms)
        self._run(pipe.execute)

    def get(self, key: ChunkKey) -> bytes:
        payload_key = self._payload_key(key)
        blob = self._run(lambda: self._client.get(payload_key))
        if blob is None:
            self._counters.count(is_hit=False)
            self._run(lambda: self._client.hdel(self._index_key(key), str(key.level)))
            raise ChunkNotFound(f"no chunk {key.group} level {key.level} in redis store {self._where}")
        try:
            data = unframe(key, blob, Path(payload_key))
        except FormatError:
            log.warning("corrupt payload removed key=%s", payload_key)
            self.delete(key)
            raise
        self._counters.count(is_hit=True)
        return data

    def lookup(self, keys: Sequence[ChunkKey]) -> list[ChunkInfo]:
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(self._index_key(key))
        found: list[ChunkInfo] = []
        for levels in self._run(pipe.execute) if keys else []:
            if not levels:
                break
            found.append(ChunkInfo({int(level): int(size) for level, size in levels.items()}))
        return found

    def delete(self, key: ChunkKey) -> int:
        index_key = self._index_key(key)
        levels = self._run(lambda: self._client.hkeys(index_key))
        payload_keys = [self._payload_key(key, int(level)) for level in levels]
        if not payload_keys:
            return 0
        return int(self._run(lambda: self._client.delete(*payload_keys, index_key))) - 1

    def stats(self) -> StoreStats:
        return self._run(self._stats)

    def _stats(self) -> StoreStats:
        num_chunks = num_payloads = size_bytes = 0
        for index_key in self._client.scan_iter(match="cg:*", _type="hash", count=1000):
            sizes = [int(size) for size in self._client.hvals(index_key)]
            num_chunks += 1
            num_payloads += len(sizes)
            size_bytes += sum(sizes)
        is_cluster = isinstance(self._client, RedisCluster)
        if is_cluster:
            nodes = self._client.info("memory", target_nodes=RedisCluster.PRIMARIES).values()
        else:
            nodes = [self._client.info("memory")]
        capacity = sum(int(node.get("maxmemory", 0)) for node in nodes)
        name = "redis-cluster" if is_cluster else "redis"
        counters = self._counters
        return StoreStats(name, num_chunks, num_payloads, size_bytes, capacity, counters.hits, counters.misses, 0)

    def close(self) -> None:
        self._client.close()


def _nodes(netloc: str, url: str) -> list[ClusterNode]:
    nodes = []
    for item in filter(None, netloc.split(",")):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidRequest(f"cluster node must be host:port, got {item!r} in {url!r}")
        nodes.append(ClusterNode(host, int(port)))
    if not nodes:
        raise InvalidRequest(f"redis-cluster URL names no nodes: {url!r}")
    return nodes


def open_redis(url: str, ttl_s: float | None) -> RedisBackend:
    """Connect to ``redis://host:port[/db]`` or ``redis-cluster://host:port,host:port``; StoreUnavailable if down."""
    parts = urlsplit(url)
    where = parts.netloc
    with _redis_errors(where):
        if parts.scheme == "redis-cluster":
            client = RedisCluster(startup_nodes=_nodes(parts.netloc, url), retry=_retry(), **_TIMEOUTS)
        else:
            client = redis.Redis.from_url(url.split("?", 1)[0], retry=_retry(), **_TIMEOUTS)
            client.ping()
    return RedisBackend(client, where, ttl_s)
