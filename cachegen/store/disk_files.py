"""Files of the disk backend: the payload frame, atomic writes, and walks of the tree.

A file is ``HEADER`` (magic, header version, the full ChunkKey, payload length, CRC-32 of the payload) then the
payload. Only names that match the store's own patterns are ever reported or removed, so a mistaken root cannot
lose files that are not the store's.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from cachegen.errors import FormatError
from cachegen.spec import ChunkKey

log = logging.getLogger(__name__)

HEADER = struct.Struct("<4sH69sQI")  # magic, header version, ChunkKey.to_bytes(), payload bytes, CRC-32
_MAGIC = b"CGST"
_HEADER_VERSION = 1
TMP_PREFIX = ".tmp-"
STALE_TMP_S = 300.0
"""A temp file older than this belongs to a crashed writer (a live put takes far less) and is removed."""


@dataclass(frozen=True, slots=True)
class ScanEntry:
    path: Path
    size_bytes: int
    atime_ns: int
    mtime_ns: int


def remove_quietly(path: Path) -> bool:
    """Unlink ``path``; False when another process removed it first."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _entry(dir_entry: os.DirEntry[str]) -> ScanEntry | None:
    try:
        st = dir_entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return None  # removed by another process between readdir and stat
    return ScanEntry(Path(dir_entry.path), st.st_size, st.st_atime_ns, st.st_mtime_ns)


def list_chunk_files(leaf: Path, prefix: str) -> list[ScanEntry]:
    """Payload files in ``leaf`` whose names start with ``prefix`` (one chunk's levels); [] if none."""
    try:
        with os.scandir(leaf) as it:
            matches = [e for e in it if e.name.startswith(prefix) and e.name.endswith(".kv")]
    except FileNotFoundError:
        return []
    entries = [_entry(e) for e in matches]
    return [e for e in entries if e is not None]


def _subdirs(path: str) -> list[str]:
    try:
        with os.scandir(path) as it:
            return [e.path for e in it if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _scan_leaf(leaf: str, name_re: re.Pattern[str], now_ns: int) -> list[ScanEntry]:
    found: list[ScanEntry] = []
    try:
        with os.scandir(leaf) as it:
            dir_entries = list(it)
    except FileNotFoundError:
        return found
    for dir_entry in dir_entries:
        is_payload = name_re.fullmatch(dir_entry.name) is not None
        if not is_payload and not dir_entry.name.startswith(TMP_PREFIX):
            continue
        entry = _entry(dir_entry)
        if entry is None:
            continue
        if is_payload:
            found.append(entry)
        elif now_ns - entry.mtime_ns > STALE_TMP_S * 1e9 and remove_quietly(entry.path):
            log.info("stale temp file removed path=%s", entry.path)
    return found


def scan_tree(root: Path, name_re: re.Pattern[str]) -> list[ScanEntry]:
    """Every payload file under ``root/<namespace>/<aa>/<bb>/``; stale temp files on the way are removed."""
    now_ns = time.time_ns()
    found: list[ScanEntry] = []
    for namespace_dir in _subdirs(str(root)):
        for fan1 in _subdirs(namespace_dir):
            for leaf in _subdirs(fan1):
                found.extend(_scan_leaf(leaf, name_re, now_ns))
    return found


def frame_header(key: ChunkKey, data: bytes) -> bytes:
    return HEADER.pack(_MAGIC, _HEADER_VERSION, key.to_bytes(), len(data), zlib.crc32(data))


def unframe(key: ChunkKey, blob: bytes, path: Path) -> bytes:
    """The payload of a stored blob (header then payload) after ``check_frame``."""
    return check_frame(key, blob[: HEADER.size], blob[HEADER.size :], path)


def check_frame(key: ChunkKey, header: bytes, payload: bytes, path: Path) -> bytes:
    """``payload`` after checking its header: magic, version, key, length and CRC; raises FormatError."""
    if len(header) < HEADER.size:
        raise FormatError("store header", 0, len(header), f"file {path} shorter than its header")
    magic, version, key_bytes, length, crc = HEADER.unpack_from(header)
    if magic != _MAGIC or version != _HEADER_VERSION:
        raise FormatError("store magic/version", 0, (magic, version), f"in {path}")
    if key_bytes != key.to_bytes():
        raise FormatError("store key", 6, key_bytes.hex(), f"{path} holds another key")
    if len(payload) != length:
        raise FormatError("store payload length", 75, len(payload), f"header says {length} in {path}")
    if zlib.crc32(payload) != crc:
        raise FormatError("store payload crc32", HEADER.size, zlib.crc32(payload), f"expected {crc} in {path}")
    return payload


def write_atomically(path: Path, parts: tuple[bytes, ...], is_durable: bool) -> None:
    """Write ``parts`` to a temp file beside ``path``, fsync, then rename over ``path`` (and fsync the dir)."""
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            for part in parts:
                file.write(part)
            file.flush()
            if is_durable:
                os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(Path(tmp))
        raise
    if is_durable:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
