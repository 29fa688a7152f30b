"""Per-model probability tables (FORMAT.md §8): computed once from real KV, stored once, referenced by id.

A ``CodecTables`` file holds, for every coded level, the bins per (layer, K|V), the table index of every
(layer, K|V, head, symbol-in-token) and the frequency rows. Its id is the BLAKE2b-128 of its bytes; frames carry
that id, so a frame is never decoded with other tables than it was coded with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cachegen.codec import token_classes
from cachegen.codec.bitstream import DTYPE_CODES, DTYPE_NAMES, crc32
from cachegen.codec.levels import SCHEME_BY_LEVEL
from cachegen.codec.rans import TOTAL, Tables
from cachegen.codec.transform import CROSS_LAYER_MAGIC, Transform, read_cross_layer, read_transform
from cachegen.errors import FormatError
from cachegen.spec import KVLayout

TABLES_MAGIC = b"CGCT"
TABLES_VERSION = 1
_HEAD = struct.Struct("<4sHHHHBBI")  # magic, version, layers, heads, dim, dtype, model id len, tokens_per_chunk
_LEVEL = struct.Struct("<BHIH")  # level id, alphabet, num_tables, symbols per token


@dataclass(slots=True, frozen=True)
class LevelTables:
    """Tables of one level: ``bins`` (layers, 2) u16 (0 = lossless), ``table_map`` (layers, 2, heads, P) u32."""

    level: int
    bins: np.ndarray
    table_map: np.ndarray
    tables: Tables
    slots: np.ndarray = field(init=False, repr=False, default_factory=lambda: np.zeros(0, np.uint8))
    """Derived, not stored: (num_tables, 256) u8 symbol of each quantile >> 16 (the C++ decoder's fast lookup)."""
    bounds: np.ndarray = field(init=False, repr=False, default_factory=lambda: np.zeros(0, np.uint32))
    """Derived, not stored: (num_tables, alphabet + 2) u32, each row cum then 2^24 twice: one 8-byte load at symbol
    s gives its cum and the next (their difference is freq), the C++ decoder's one load per step (codec.h)."""
    device_copies: dict = field(init=False, repr=False, compare=False, default_factory=dict)
    """Memo of these tables uploaded to a GPU, keyed by device (``_ext.device_tables``): uploaded once per model."""

    @property
    def quant_bins(self) -> np.ndarray | None:
        """``bins`` of a quantized level (what ``symbols_of`` takes); None for the lossless level (all 0)."""
        return self.bins if self.bins.any() else None

    def __post_init__(self) -> None:
        cum = self.tables.cum.astype(np.int64)
        num_tables, alphabet = cum.shape
        base = (np.arange(num_tables, dtype=np.int64) << 24)[:, None]
        probes = (base + (np.arange(256, dtype=np.int64) << 16)[None, :]).ravel()
        flat = np.searchsorted((cum + base).ravel(), probes, side="right") - 1  # rows sorted, one search for all
        slots = flat.reshape(num_tables, 256) - np.arange(num_tables)[:, None] * alphabet
        object.__setattr__(self, "slots", slots.astype(np.uint8))
        bounds = np.full((num_tables, alphabet + 2), TOTAL, np.uint32)
        bounds[:, :alphabet] = cum
        object.__setattr__(self, "bounds", bounds)


@dataclass(slots=True, frozen=True)
class CodecTables:
    """Everything the coded levels need besides the frame; one per (model, layout)."""

    layout: KVLayout
    model_id: bytes
    levels: tuple[LevelTables, ...]
    transform: Transform | None = None
    """The per-model transform of the transform-coded levels (FORMAT.md §8.1); None: those levels are absent."""
    id: bytes = field(init=False, default=b"")
    """16 bytes naming these exact tables (FORMAT.md §8): BLAKE2b-128 of ``to_bytes()``; frames carry it."""

    def __post_init__(self) -> None:
        # Hashing ~25 MB of tables costs tens of ms: do it once here, not on every frame.
        object.__setattr__(self, "id", hashlib.blake2b(self.to_bytes(), digest_size=16).digest())

    def for_level(self, level: int) -> LevelTables | None:
        """The level's tables; None when absent, or a transform level without its steps in ``transform``."""
        entry = next((entry for entry in self.levels if entry.level == level), None)
        if entry is not None and SCHEME_BY_LEVEL[level].is_transform:
            return entry if self.transform is not None and self.transform.has_level(level) else None
        return entry

    def to_bytes(self) -> bytes:
        layout = self.layout
        parts = [
            _HEAD.pack(TABLES_MAGIC, TABLES_VERSION, layout.num_layers, layout.num_kv_heads, layout.head_dim,
                       DTYPE_CODES[layout.dtype], len(self.model_id), layout.tokens_per_chunk),
            self.model_id, struct.pack("<H", len(self.levels)),
        ]  # fmt: skip
        for entry in self.levels:
            freq = entry.tables.freq
            parts.append(_LEVEL.pack(entry.level, freq.shape[1], freq.shape[0], entry.table_map.shape[-1]))
            parts += [entry.bins.astype("<u2").tobytes(), entry.table_map.astype("<u4").tobytes()]
            parts.append(freq.astype("<u4").tobytes())
        if self.transform is not None:
            parts.append(self.transform.to_bytes())
        body = b"".join(parts)
        return body + struct.pack("<I", crc32(body))

    def save(self, path: Path) -> None:
        """Write atomically (temp file + rename): a reader never sees half a table file."""
        scratch = path.with_suffix(path.suffix + ".tmp")
        scratch.write_bytes(self.to_bytes())
        scratch.replace(path)


class _Reader:
    """Bounds-checked cursor over untrusted table bytes."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, size: int, field: str) -> bytes:
        if size < 0 or self.at + size > len(self.data):
            raise FormatError(field, self.at, size, f"only {len(self.data) - self.at} bytes left")
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk

    def peek(self, size: int) -> bytes:
        return self.data[self.at : self.at + size]

    def array(self, count: int, dtype: str, field: str) -> np.ndarray:
        return np.frombuffer(self.take(count * np.dtype(dtype).itemsize, field), dtype).astype(np.dtype(dtype[1:]))


def load_tables(data: bytes) -> CodecTables:
    """Parse a table file, checking magic, version, CRC and every size; FormatError on anything wrong."""
    if len(data) < _HEAD.size + 4 or crc32(data[:-4]) != struct.unpack_from("<I", data, len(data) - 4)[0]:
        raise FormatError("tables_crc32", max(len(data) - 4, 0), len(data), "truncated or corrupt table file")
    reader = _Reader(data[:-4])
    magic, version, layers, heads, dim, dtype, id_len, per_chunk = _HEAD.unpack(reader.take(_HEAD.size, "header"))
    if magic != TABLES_MAGIC or version != TABLES_VERSION or dtype not in DTYPE_NAMES:
        raise FormatError("tables_header", 0, (magic, version, dtype), "not a cachegen table file of version 1")
    layout = KVLayout(layers, heads, dim, DTYPE_NAMES[dtype], per_chunk)
    model_id = reader.take(id_len, "model_id")
    (num_levels,) = struct.unpack("<H", reader.take(2, "num_levels"))
    levels = tuple(_read_level(reader, layout) for _ in range(num_levels))
    transform = read_transform(reader.take, layout) if reader.at < len(reader.data) else None
    # then the optional probe and cross-layer records, in that order (FORMAT.md §8.2, §8.3)
    if transform is not None and reader.at < len(reader.data) and reader.peek(4) != CROSS_LAYER_MAGIC:
        transform = dataclasses.replace(transform, probe=token_classes.read_probe(reader.take, layout))
    if transform is not None and reader.at < len(reader.data):
        transform = dataclasses.replace(transform, cross_layer=read_cross_layer(reader.take, layout))
    if reader.at != len(reader.data):
        raise FormatError("tables_size", reader.at, len(data), "trailing bytes")
    return CodecTables(layout, model_id, levels, transform)


def _read_level(reader: _Reader, layout: KVLayout) -> LevelTables:
    level, alphabet, num_tables, per_token = _LEVEL.unpack(reader.take(_LEVEL.size, "level"))
    if level not in SCHEME_BY_LEVEL:
        raise FormatError("level", reader.at, level, f"no coded level {level}")
    if per_token not in (layout.head_dim, 2 * layout.head_dim) or not 2 <= alphabet <= 256:
        raise FormatError("level_shape", reader.at, (alphabet, per_token), "alphabet 2..256, P = dim or 2*dim")
    bins = reader.array(layout.num_layers * 2, "<u2", "bins").reshape(layout.num_layers, 2)
    shape = (layout.num_layers, 2, layout.num_kv_heads, per_token)
    table_map = reader.array(int(np.prod(shape)), "<u4", "table_map").reshape(shape)
    freq = reader.array(num_tables * alphabet, "<u4", "freq").reshape(num_tables, alphabet)
    if SCHEME_BY_LEVEL[level].is_transform and (alphabet != 255 or per_token != layout.head_dim or np.any(bins != 256)):
        raise FormatError(
            "level_shape", reader.at, (level, alphabet, per_token), "levels 6-9 need A 255, P D, bins 256"
        )
    low, high = token_classes.MAP_RANGE
    if SCHEME_BY_LEVEL[level].token_adaptive and (
        num_tables != token_classes.LADDER_TABLES or int(table_map.min()) < low or int(table_map.max()) > high
    ):
        raise FormatError("table_map", reader.at, num_tables, f"a ladder level needs 96 tables, map in [{low}, {high}]")
    quantized = bins.any()
    if quantized and not bool(np.all((bins >= 4) & (bins <= 256) & (bins % 2 == 0))):
        raise FormatError("bins", reader.at, bins.tolist(), "quantized levels need even bins in [4, 256]")
    if table_map.size and int(table_map.max()) >= num_tables:
        raise FormatError("table_map", reader.at, int(table_map.max()), f"only {num_tables} tables")
    try:
        return LevelTables(level, bins, table_map, Tables(freq))
    except ValueError as exc:
        raise FormatError("freq", reader.at, num_tables, str(exc)) from exc


def freq_from_counts(counts: np.ndarray) -> np.ndarray:
    """Integer rows summing to 2^24 with every entry >= 1, proportional to ``counts`` (encoder side only)."""
    alphabet = counts.shape[1]
    share = counts / counts.sum(axis=1, keepdims=True)
    freq = 1 + np.floor(share * (TOTAL - alphabet)).astype(np.int64)
    rows = np.arange(freq.shape[0])
    freq[rows, freq.argmax(axis=1)] += TOTAL - freq.sum(axis=1)
    return freq.astype(np.uint32)


def default_tables_path(home: Path, model_id: bytes) -> Path:
    """Where ``cachegen calibrate`` stores a model's tables by default: ``<home>/tables/<model id hex>.cgct``."""
    return home / "tables" / f"{model_id.hex()}.cgct"
