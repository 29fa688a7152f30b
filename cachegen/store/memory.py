"""In-process LRU backend for tests and single-process use; nothing survives the process."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

from cachegen.errors import ChunkNotFound, InvalidRequest
from cachegen.spec import ChunkKey
from cachegen.store.backends import (
    DEFAULT_CAPACITY_BYTES,
    DEFAULT_NAMESPACE,
    ChunkInfo,
    StoreStats,
    check_namespace,
    chunk_id,
)

_ChunkRef = tuple[str, tuple[bytes, bytes, bytes]]  # (namespace, chunk id)
_Slot = tuple[str, tuple[bytes, bytes, bytes], int]  # (namespace, chunk id, level)


class _MemoryState:
    """State shared by all namespace views of one MemoryBackend. Callers hold ``lock``."""

    def __init__(self, capacity_bytes: int, ttl_s: float | None) -> None:
        self.capacity_bytes = capacity_bytes
        self.ttl_s = ttl_s
        self.lock = threading.Lock()
        self.payloads: OrderedDict[_Slot, tuple[bytes, float]] = OrderedDict()  # oldest use first
        self.levels: dict[_ChunkRef, set[int]] = {}  # the levels held per chunk, for lookup
        self.size_bytes = 0
        self.hits = self.misses = self.evictions = 0

    def add(self, slot: _Slot, data: bytes) -> None:
        self.remove(slot)
        self.payloads[slot] = (data, time.monotonic())
        self.levels.setdefault(slot[:2], set()).add(slot[2])
        self.size_bytes += len(data)
        while self.size_bytes > self.capacity_bytes:
            self.remove(next(iter(self.payloads)))
            self.evictions += 1

    def remove(self, slot: _Slot) -> bool:
        entry = self.payloads.pop(slot, None)
        if entry is None:
            return False
        self.size_bytes -= len(entry[0])
        levels = self.levels[slot[:2]]
        levels.discard(slot[2])
        if not levels:
            del self.levels[slot[:2]]
        return True

    def find(self, slot: _Slot) -> bytes | None:
        """The live payload in ``slot``; an expired one is dropped."""
        entry = self.payloads.get(slot)
        if entry is None:
            return None
        if self.ttl_s is not None and time.monotonic() - entry[1] > self.ttl_s:
            self.remove(slot)
            return None
        return entry[0]


class MemoryBackend:
    """Bounded LRU store in this process's memory; thread-safe."""

    def __init__(
        self,
        capacity_bytes: int = DEFAULT_CAPACITY_BYTES,
        ttl_s: float | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        _state: _MemoryState | None = None,
    ) -> None:
        self._ns = check_namespace(namespace)
        self._state = _state or _MemoryState(capacity_bytes, ttl_s)

    def namespaced(self, namespace: str) -> MemoryBackend:
        """A view of the same memory under another tenant's namespace (shared capacity)."""
        return MemoryBackend(namespace=namespace, _state=self._state)

    def _slot(self, key: ChunkKey, level: int | None = None) -> _Slot:
        return (self._ns, chunk_id(key), key.level if level is None else level)

    def put(self, key: ChunkKey, data: bytes) -> None:
        state = self._state
        if len(data) > state.capacity_bytes:
            raise InvalidRequest(f"payload of {len(data)} bytes exceeds capacity {state.capacity_bytes}")
        with state.lock:
            state.add(self._slot(key), bytes(data))

    def get(self, key: ChunkKey) -> bytes:
        state, slot = self._state, self._slot(key)
        with state.lock:
            data = state.find(slot)
            if data is None:
                state.misses += 1
                raise ChunkNotFound(f"no chunk {key.group} level {key.level} in memory store")
            state.payloads.move_to_end(slot)
            state.hits += 1
            return data

    def lookup(self, keys: Sequence[ChunkKey]) -> list[ChunkInfo]:
        found: list[ChunkInfo] = []
        with self._state.lock:
            for key in keys:
                levels = {}
                for level in sorted(self._state.levels.get((self._ns, chunk_id(key)), ())):
                    data = self._state.find(self._slot(key, level))
                    if data is not None:
                        levels[level] = len(data)
                if not levels:
                    break
                found.append(ChunkInfo(levels))
        return found

    def delete(self, key: ChunkKey) -> int:
        state = self._state
        with state.lock:
            levels = sorted(state.levels.get((self._ns, chunk_id(key)), ()))
            return sum(state.remove(self._slot(key, level)) for level in levels)

    def stats(self) -> StoreStats:
        state = self._state
        with state.lock:
            return StoreStats(
                "memory", len(state.levels), len(state.payloads), state.size_bytes, state.capacity_bytes,
                state.hits, state.misses, state.evictions,
            )  # fmt: skip

    def close(self) -> None:
        """Nothing to release; the memory goes with the last reference."""
