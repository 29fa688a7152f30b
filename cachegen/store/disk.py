"""Disk backend: one file per (chunk, level), shared safely by several processes without a shared index.

Layout: ``<root>/<namespace>/<g[0:2]>/<g[2:4]>/<group>.<tag>.<level>.kv`` where ``group`` is the chunk's chained
prefix hash in hex and ``tag`` names the model and layout. Each file is a small header (magic, full key, length,
CRC-32 of the payload) and the payload. A put writes a temp file in the same directory, fsyncs it and renames it
into place, so the name appears only when the whole payload is on disk; a crashed writer leaves only a
``.tmp-*`` file that readers ignore and a later scan removes.

Recency for LRU eviction is the file's atime, which ``get`` sets explicitly (mount options do not matter); the
mtime is the write time, used for the TTL. Every process keeps only an estimate of the total size and rescans the
tree when the estimate passes capacity or grows stale, so processes sharing one root agree through the file
system alone.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cachegen.errors import ChunkNotFound, FormatError, InvalidRequest, StoreUnavailable
from cachegen.spec import ChunkKey
from cachegen.store.backends import (
    DEFAULT_CAPACITY_BYTES,
    DEFAULT_NAMESPACE,
    ChunkInfo,
    StoreStats,
    check_namespace,
)
from cachegen.store.disk_files import (
    HEADER,
    TMP_PREFIX,
    ScanEntry,
    check_frame,
    frame_header,
    list_chunk_files,
    remove_quietly,
    scan_tree,
    write_atomically,
)

log = logging.getLogger(__name__)

_MARKER = "cachegen-store"
_LOW_WATERMARK = 0.9  # eviction frees down to this fraction of capacity, so scans are amortised
_RESCAN_INTERVAL_S = 10.0
_NAME_RE = re.compile(r"([0-9a-f]{64})\.([0-9a-f]{8})\.(\d{1,3})\.kv")


@dataclass(frozen=True, slots=True)
class DiskOptions:
    root: Path
    capacity_bytes: int
    ttl_s: float | None
    is_durable: bool


class _Shared:
    """Per-process state shared by the namespace views of one root: size estimate and counters."""

    def __init__(self, options: DiskOptions) -> None:
        self.options = options
        self.lock = threading.Lock()
        self.size_estimate = 0
        self.last_scan = 0.0
        self.hits = self.misses = self.evictions = 0


def layout_tag(key: ChunkKey) -> str:
    """8 hex digits naming the model and KV layout, so another layout never reads this chunk's file."""
    return zlib.crc32(key.model_id + key.layout_digest).to_bytes(4, "little").hex()


class DiskBackend:
    """Bounded LRU store in a directory; see the module docstring for the layout and the concurrency rules."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        capacity_bytes: int = DEFAULT_CAPACITY_BYTES,
        *,
        ttl_s: float | None = None,
        is_durable: bool = True,
        namespace: str = DEFAULT_NAMESPACE,
    ) -> None:
        options = DiskOptions(Path(root), capacity_bytes, ttl_s, is_durable)
        self._ns = check_namespace(namespace)
        self._shared = _Shared(options)
        _prepare_root(options.root)
        self._rescan()

    @classmethod
    def _view(cls, shared: _Shared, namespace: str) -> DiskBackend:
        view = cls.__new__(cls)
        view._ns, view._shared = check_namespace(namespace), shared
        return view

    def namespaced(self, namespace: str) -> DiskBackend:
        """A view of the same root under another tenant's namespace (shared capacity and eviction)."""
        return DiskBackend._view(self._shared, namespace)

    @property
    def root(self) -> Path:
        return self._shared.options.root

    def _leaf(self, group: str) -> Path:
        return self.root / self._ns / group[0:2] / group[2:4]

    def _path(self, key: ChunkKey) -> Path:
        return self._leaf(key.group) / f"{key.group}.{layout_tag(key)}.{key.level}.kv"

    def _is_expired(self, mtime_ns: int) -> bool:
        ttl_s = self._shared.options.ttl_s
        return ttl_s is not None and time.time_ns() - mtime_ns > ttl_s * 1e9

    # --- writes ---------------------------------------------------------------------------------------------

    def put(self, key: ChunkKey, data: bytes) -> None:
        options = self._shared.options
        if len(data) + HEADER.size > options.capacity_bytes:
            raise InvalidRequest(f"payload of {len(data)} bytes exceeds capacity {options.capacity_bytes}")
        path = self._path(key)
        header = frame_header(key, data)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            old_size = _size_or_zero(path)
            write_atomically(path, (header, data), options.is_durable)
        except OSError as exc:
            raise StoreUnavailable(f"disk store cannot write {path}: {exc}") from exc
        with self._shared.lock:
            self._shared.size_estimate += HEADER.size + len(data) - old_size
        self._maybe_evict()

    def delete(self, key: ChunkKey) -> int:
        prefix = f"{key.group}.{layout_tag(key)}."
        try:
            entries = list_chunk_files(self._leaf(key.group), prefix)
        except OSError as exc:
            raise StoreUnavailable(f"disk store cannot list {self._leaf(key.group)}: {exc}") from exc
        removed = 0
        for entry in entries:
            if remove_quietly(entry.path):
                removed += 1
                with self._shared.lock:
                    self._shared.size_estimate -= entry.size_bytes
        return removed

    # --- reads ----------------------------------------------------------------------------------------------

    def get(self, key: ChunkKey) -> bytes:
        path = self._path(key)
        try:
            parts = self._read_and_touch(path)
        except OSError as exc:
            raise StoreUnavailable(f"disk store cannot read {path}: {exc}") from exc
        with self._shared.lock:
            if parts is None:
                self._shared.misses += 1
            else:
                self._shared.hits += 1
        if parts is None:
            raise ChunkNotFound(f"no chunk {key.group} level {key.level} in disk store {self.root}")
        return _checked(key, *parts, path)

    def _read_and_touch(self, path: Path) -> tuple[bytes, bytes] | None:
        """Header and payload, or None when absent or expired. Marks the file as just used (atime) for LRU."""
        try:
            with open(path, "rb") as file:
                st = os.fstat(file.fileno())
                if self._is_expired(st.st_mtime_ns):
                    remove_quietly(path)
                    return None
                header, payload = file.read(HEADER.size), file.read()  # two reads: no copy of the payload
                try:
                    os.utime(file.fileno(), ns=(time.time_ns(), st.st_mtime_ns))
                except PermissionError:
                    log.debug("cannot touch %s; its recency stays stale", path)
                return header, payload
        except FileNotFoundError:
            return None

    def lookup(self, keys: Sequence[ChunkKey]) -> list[ChunkInfo]:
        found: list[ChunkInfo] = []
        for key in keys:
            levels: dict[int, int] = {}
            try:
                entries = list_chunk_files(self._leaf(key.group), f"{key.group}.{layout_tag(key)}.")
            except OSError as exc:
                raise StoreUnavailable(f"disk store cannot list {self._leaf(key.group)}: {exc}") from exc
            for entry in entries:
                if self._is_expired(entry.mtime_ns):
                    remove_quietly(entry.path)
                    continue
                levels[_level_of(entry.path.name)] = entry.size_bytes - HEADER.size
            if not levels:
                break
            found.append(ChunkInfo(levels))
        return found

    # --- capacity -------------------------------------------------------------------------------------------

    def _scan(self) -> list[ScanEntry]:
        """Every payload file under the root (all namespaces); drops expired ones and stale temp files."""
        try:
            entries = scan_tree(self.root, _NAME_RE)
        except OSError as exc:
            raise StoreUnavailable(f"disk store cannot scan {self.root}: {exc}") from exc
        live = [e for e in entries if not self._is_expired(e.mtime_ns) or not remove_quietly(e.path)]
        return live

    def _rescan(self) -> list[ScanEntry]:
        entries = self._scan()
        with self._shared.lock:
            self._shared.size_estimate = sum(e.size_bytes for e in entries)
            self._shared.last_scan = time.monotonic()
        return entries

    def _maybe_evict(self) -> None:
        shared = self._shared
        capacity = shared.options.capacity_bytes
        is_stale = time.monotonic() - shared.last_scan > _RESCAN_INTERVAL_S
        if shared.size_estimate <= capacity and not is_stale:
            return
        entries = self._rescan()
        total = sum(e.size_bytes for e in entries)
        if total <= capacity:
            return
        target = int(capacity * _LOW_WATERMARK)
        evicted = 0
        for entry in sorted(entries, key=lambda e: e.atime_ns):
            if total <= target:
                break
            if remove_quietly(entry.path):
                total -= entry.size_bytes
                evicted += 1
        with shared.lock:
            shared.size_estimate, shared.evictions = total, shared.evictions + evicted
        log.info("disk store evicted root=%s payloads=%d size_bytes=%d", self.root, evicted, total)

    def stats(self) -> StoreStats:
        entries = self._rescan()
        shared = self._shared
        num_chunks = len({(e.path.parent.parent.parent.name, e.path.name.rsplit(".", 2)[0]) for e in entries})
        return StoreStats(
            "disk",
            num_chunks,
            len(entries),
            sum(e.size_bytes for e in entries),
            shared.options.capacity_bytes,
            shared.hits,
            shared.misses,
            shared.evictions,
        )

    def close(self) -> None:
        """Nothing is buffered: every acknowledged put is already on disk."""


def _level_of(name: str) -> int:
    return int(name.rsplit(".", 2)[1])


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _checked(key: ChunkKey, header: bytes, payload: bytes, path: Path) -> bytes:
    """The payload of a stored file; a file that fails its checks is removed (a later put rewrites it)."""
    try:
        return check_frame(key, header, payload, path)
    except FormatError:
        log.warning("corrupt payload removed path=%s", path)
        remove_quietly(path)
        raise


def _prepare_root(root: Path) -> None:
    """Create the root with its marker; refuse a non-empty directory that is not a store (eviction deletes)."""
    marker = root / _MARKER
    try:
        root.mkdir(parents=True, exist_ok=True)
        if marker.exists():
            return
        if any(not p.name.startswith(TMP_PREFIX) for p in root.iterdir()):
            raise InvalidRequest(f"refusing to use non-empty directory {root} as a store (no {_MARKER} marker)")
        write_atomically(marker, (b"cachegen disk store, header version 1\n",), is_durable=True)
    except OSError as exc:
        raise StoreUnavailable(f"disk store cannot open {root}: {exc}") from exc
