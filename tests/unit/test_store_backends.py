"""Storage backends (memory, disk): the KVStore contract, eviction, TTL, restart, atomicity and corruption."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from cachegen.errors import ChunkNotFound, FormatError, InvalidRequest
from cachegen.spec import ChunkKey
from cachegen.store import ChunkInfo, DiskBackend, KVStore, MemoryBackend, open_store

MODEL = b"m" * 16
LAYOUT = b"l" * 16


def key(index: int, level: int = 0, salt: bytes = b"") -> ChunkKey:
    prefix = hashlib.blake2b(salt + index.to_bytes(4, "little"), digest_size=32).digest()
    return ChunkKey(MODEL, LAYOUT, prefix, index, level)


@pytest.fixture(params=["memory", "disk"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> KVStore:
    if request.param == "memory":
        return MemoryBackend(capacity_bytes=1 << 20)
    return DiskBackend(tmp_path / "kv", capacity_bytes=1 << 20, is_durable=False)


def test_multi_level_round_trip(store: KVStore) -> None:
    store.put(key(0, 0), b"raw" * 10)
    store.put(key(0, 2), b"coded")
    assert store.get(key(0, 0)) == b"raw" * 10
    assert store.get(key(0, 2)) == b"coded"
    assert store.lookup([key(0)]) == [ChunkInfo({0: 30, 2: 5})]
    with pytest.raises(ChunkNotFound):
        store.get(key(0, 1))


def test_lookup_stops_at_first_miss_and_ignores_level(store: KVStore) -> None:
    for index in (0, 1, 3):
        store.put(key(index, 1), bytes(index + 1))
    infos = store.lookup([key(i, level=7) for i in range(4)])
    assert infos == [ChunkInfo({1: 1}), ChunkInfo({1: 2})]
    assert store.lookup([key(2), key(3)]) == []


def test_overwrite_and_delete(store: KVStore) -> None:
    store.put(key(0, 0), b"a")
    store.put(key(0, 0), b"bb")
    store.put(key(0, 1), b"c")
    store.put(key(1, 0), b"d")
    assert store.get(key(0, 0)) == b"bb"
    assert store.delete(key(0, 5)) == 2
    assert store.lookup([key(0)]) == []
    assert store.get(key(1, 0)) == b"d"
    assert store.delete(key(0)) == 0


def test_stats_count_chunks_payloads_hits(store: KVStore) -> None:
    store.put(key(0, 0), b"x" * 100)
    store.put(key(0, 1), b"y" * 10)
    store.get(key(0, 0))
    with pytest.raises(ChunkNotFound):
        store.get(key(9))
    stats = store.stats()
    assert (stats.num_chunks, stats.num_payloads, stats.hits, stats.misses) == (1, 2, 1, 1)
    assert stats.size_bytes >= 110 and stats.capacity_bytes == 1 << 20


def test_lru_eviction_keeps_recently_read(store: KVStore) -> None:
    payload = b"p" * (250 << 10)
    for index in range(4):
        store.put(key(index), payload)
        time.sleep(0.01)  # distinct atimes on coarse-clock file systems
    store.get(key(0))  # now the most recently used
    store.put(key(4), payload)  # 5 x 250 KiB > 1 MiB: evicts the least recently used (chunk 1)
    assert store.get(key(0)) == payload
    assert store.get(key(4)) == payload
    with pytest.raises(ChunkNotFound):
        store.get(key(1))
    assert store.stats().evictions >= 1


def test_payload_larger_than_capacity_refused(store: KVStore) -> None:
    with pytest.raises(InvalidRequest):
        store.put(key(0), bytes(2 << 20))


def test_ttl_expires_payloads(tmp_path: Path) -> None:
    for backend in (MemoryBackend(ttl_s=0.05), DiskBackend(tmp_path, ttl_s=0.05, is_durable=False)):
        backend.put(key(0), b"x")
        assert backend.get(key(0)) == b"x"
        time.sleep(0.1)
        assert backend.lookup([key(0)]) == []
        with pytest.raises(ChunkNotFound):
            backend.get(key(0))


def test_namespaces_are_isolated(tmp_path: Path) -> None:
    for base in (MemoryBackend(), DiskBackend(tmp_path, is_durable=False)):
        alice, bob = base.namespaced("alice"), base.namespaced("bob")
        alice.put(key(0), b"secret")
        assert bob.lookup([key(0)]) == []
        with pytest.raises(ChunkNotFound):
            bob.get(key(0))
        assert bob.delete(key(0)) == 0
        assert alice.get(key(0)) == b"secret"
        with pytest.raises(InvalidRequest):
            base.namespaced("../etc")


def test_disk_restart_keeps_everything(tmp_path: Path) -> None:
    first = DiskBackend(tmp_path / "kv")
    for index in range(5):
        first.put(key(index, 0), bytes([index]) * 1000)
        first.put(key(index, 1), bytes([index]) * 10)
    first.close()
    second = DiskBackend(tmp_path / "kv")
    assert len(second.lookup([key(i) for i in range(6)])) == 5
    assert second.get(key(3, 1)) == b"\x03" * 10
    assert second.stats().num_payloads == 10


def test_crashed_writer_temp_file_ignored_then_cleaned(tmp_path: Path) -> None:
    store = DiskBackend(tmp_path, is_durable=False)
    store.put(key(0), b"ok")
    leaf = next(p.parent for p in tmp_path.rglob("*.kv"))
    stale = leaf / ".tmp-crashed"
    stale.write_bytes(b"half a payl")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    assert store.lookup([key(0)]) == [ChunkInfo({0: 2})]
    DiskBackend(tmp_path)  # the scan on open removes the stale temp file
    assert not stale.exists()
    assert store.get(key(0)) == b"ok"


def test_disk_corruption_detected_and_removed(tmp_path: Path) -> None:
    store = DiskBackend(tmp_path, is_durable=False)
    store.put(key(0), b"A" * 4096)
    path = next(tmp_path.rglob("*.kv"))
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 0x40
    path.write_bytes(bytes(blob))
    with pytest.raises(FormatError, match="crc32"):
        store.get(key(0))
    assert not path.exists()
    store.put(key(1), b"B" * 100)
    path = next(tmp_path.rglob("*.kv"))
    path.write_bytes(path.read_bytes()[:-10])  # truncated
    with pytest.raises(FormatError, match="length"):
        store.get(key(1))


def test_disk_refuses_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InvalidRequest, match="non-empty"):
        DiskBackend(tmp_path)


def test_open_store_urls(tmp_path: Path) -> None:
    assert isinstance(open_store("memory://"), MemoryBackend)
    disk = open_store(f"disk://{tmp_path}/kv?ttl_s=60&fsync=0", capacity_bytes=1 << 20)
    assert isinstance(disk, DiskBackend) and disk.stats().capacity_bytes == 1 << 20
    for bad in ("disk://relative/path", "ftp://x", "memory://?ttl_s=soon"):
        with pytest.raises(InvalidRequest):
            open_store(bad)
