"""The frame container of FORMAT.md §3: fixed header, model id, section table, header CRC, sections, payload CRC.

Pure bytes in, bytes out; no torch. Every size read from a frame is checked against the frame's length and the
caller's layout before anything is allocated, so hostile frames cost at most their own length.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from cachegen.errors import FormatError, LayoutMismatch, UnsupportedVersion
from cachegen.spec import DTYPE_BYTES, FORMAT_VERSION, LEVELS, MAGIC, KVLayout

# FORMAT.md §3.1: 48 bytes, little-endian.
_HEADER = struct.Struct("<4sHBBHHHBBIIIHH16s")
_SECTION = struct.Struct("<IIQ")  # kind, reserved (0), size in bytes
_CRC = struct.Struct("<I")
HEADER_SIZE = _HEADER.size
SECTION_ENTRY_SIZE = _SECTION.size

DTYPE_CODES: dict[str, int] = {"bfloat16": 1, "float16": 2, "float32": 3}
DTYPE_NAMES: dict[int, str] = {code: name for name, code in DTYPE_CODES.items()}

_LEVEL_IDS = frozenset(level.id for level in LEVELS)
MAX_MODEL_ID_BYTES = 64
MAX_SECTIONS = 16
MAX_FRAME_TOKENS = 1 << 16
"""A frame holds one chunk; this bound keeps a hostile token count from sizing a huge output (FORMAT.md §6)."""

# Offsets of header fields, for error reports (FORMAT.md §3.1).
OFFSET = {
    "magic": 0, "version": 4, "level": 6, "flags": 7, "num_layers": 8, "num_kv_heads": 10, "head_dim": 12,
    "dtype": 14, "model_id_len": 15, "tokens_per_chunk": 16, "token_start": 20, "num_tokens": 24,
    "num_sections": 28, "reserved": 30, "layout_digest": 32,
}  # fmt: skip


@dataclass(slots=True, frozen=True)
class FrameHeader:
    """The decoded fixed header plus the model id: who the KV belongs to and which tokens it covers."""

    level: int
    layout: KVLayout
    model_id: bytes
    token_start: int
    num_tokens: int


@dataclass(slots=True, frozen=True)
class Section:
    """One payload section: ``kind`` (FORMAT.md §4) and its byte range inside the frame."""

    kind: int
    offset: int
    size: int


@dataclass(slots=True, frozen=True)
class Frame:
    header: FrameHeader
    sections: tuple[Section, ...]


def crc32(data: bytes | memoryview) -> int:
    """CRC-32/ISO-HDLC (zlib's): detects every 1-3 bit error and every burst of up to 32 bits."""
    return zlib.crc32(data) & 0xFFFFFFFF


def pack_frame(header: FrameHeader, sections: Sequence[tuple[int, bytes | memoryview]]) -> bytes:
    """Serialize a frame; ``sections`` are ``(kind, payload)`` pairs in the order the level prescribes."""
    layout = header.layout
    fixed = _HEADER.pack(
        MAGIC, FORMAT_VERSION, header.level, 0, layout.num_layers, layout.num_kv_heads, layout.head_dim,
        DTYPE_CODES[layout.dtype], len(header.model_id), layout.tokens_per_chunk, header.token_start,
        header.num_tokens, len(sections), 0, layout.digest(),
    )  # fmt: skip
    table = b"".join(_SECTION.pack(kind, 0, len(payload)) for kind, payload in sections)
    head = fixed + header.model_id + table
    payload_crc = 0
    for _, payload in sections:
        payload_crc = zlib.crc32(payload, payload_crc)
    parts: list[bytes | memoryview] = [head, _CRC.pack(crc32(head))]
    parts.extend(payload for _, payload in sections)
    parts.append(_CRC.pack(payload_crc & 0xFFFFFFFF))
    return b"".join(parts)


def _check_fixed(data: bytes | memoryview) -> tuple:
    if len(data) < HEADER_SIZE:
        raise FormatError("header", len(data), len(data), f"frame shorter than the {HEADER_SIZE}-byte header")
    fields = _HEADER.unpack_from(data, 0)
    if fields[0] != MAGIC:
        raise FormatError("magic", 0, bytes(fields[0]), f"expected {MAGIC!r}")
    if fields[1] != FORMAT_VERSION:
        raise UnsupportedVersion("version", OFFSET["version"], fields[1], f"this build reads {FORMAT_VERSION}")
    model_id_len, num_sections = fields[8], fields[12]
    if not 1 <= model_id_len <= MAX_MODEL_ID_BYTES:
        raise FormatError("model_id_len", OFFSET["model_id_len"], model_id_len, f"must be 1..{MAX_MODEL_ID_BYTES}")
    if not 1 <= num_sections <= MAX_SECTIONS:
        raise FormatError("num_sections", OFFSET["num_sections"], num_sections, f"must be 1..{MAX_SECTIONS}")
    return fields


def _check_header_crc(data: bytes | memoryview, head_size: int) -> None:
    if len(data) < head_size + _CRC.size:
        raise FormatError("header", len(data), len(data), f"truncated: header and table need {head_size + 4} bytes")
    (stored,) = _CRC.unpack_from(data, head_size)
    computed = crc32(memoryview(data)[:head_size])
    if stored != computed:
        raise FormatError("header_crc32", head_size, stored, f"computed {computed:#010x}")


def _header_from_fields(fields: tuple, model_id: bytes) -> FrameHeader:
    (_, _, level, flags, layers, heads, dim, dtype, _, per_chunk, start, num_tokens, _, reserved, digest) = fields
    if flags != 0 or reserved != 0:
        raise FormatError("flags" if flags else "reserved", OFFSET["flags" if flags else "reserved"],
                          flags or reserved, "reserved bits must be 0")  # fmt: skip
    if level not in _LEVEL_IDS:
        raise FormatError("level", OFFSET["level"], level, f"known levels are {sorted(_LEVEL_IDS)}")
    if dtype not in DTYPE_NAMES:
        raise FormatError("dtype", OFFSET["dtype"], dtype, f"known codes {sorted(DTYPE_NAMES)}")
    if not 1 <= num_tokens <= MAX_FRAME_TOKENS:
        raise FormatError("num_tokens", OFFSET["num_tokens"], num_tokens, f"must be 1..{MAX_FRAME_TOKENS}")
    if start + num_tokens > 0xFFFFFFFF:
        raise FormatError("token_start", OFFSET["token_start"], start, "token range past 2^32")
    try:
        layout = KVLayout(layers, heads, dim, DTYPE_NAMES[dtype], per_chunk)
    except ValueError as exc:
        raise FormatError("layout", OFFSET["num_layers"], (layers, heads, dim, per_chunk), str(exc)) from exc
    if digest != layout.digest():
        raise FormatError("layout_digest", OFFSET["layout_digest"], digest.hex(), "does not match the layout fields")
    return FrameHeader(level, layout, model_id, start, num_tokens)


def read_header(data: bytes | memoryview) -> tuple[FrameHeader, int, int]:
    """Parse and CRC-check the header; returns it with the section-table offset and the payload offset."""
    fields = _check_fixed(data)
    model_id_len, num_sections = fields[8], fields[12]
    table_at = HEADER_SIZE + model_id_len
    head_size = table_at + num_sections * SECTION_ENTRY_SIZE
    _check_header_crc(data, head_size)
    model_id = bytes(memoryview(data)[HEADER_SIZE:table_at])
    return _header_from_fields(fields, model_id), table_at, head_size + _CRC.size


def _read_sections(data: bytes | memoryview, table_at: int, payload_at: int) -> tuple[Section, ...]:
    sections: list[Section] = []
    offset = payload_at
    for entry_at in range(table_at, payload_at - _CRC.size, SECTION_ENTRY_SIZE):
        kind, reserved, size = _SECTION.unpack_from(data, entry_at)
        if reserved != 0:
            raise FormatError("section.reserved", entry_at + 4, reserved, "reserved bits must be 0")
        if size > len(data) - offset - _CRC.size:
            raise FormatError("section.size", entry_at + 8, size, f"only {len(data) - offset} bytes follow")
        sections.append(Section(kind, offset, size))
        offset += size
    if offset + _CRC.size != len(data):
        raise FormatError("frame_size", offset + _CRC.size, len(data), f"expected {offset + _CRC.size} bytes")
    return tuple(sections)


def parse_frame(data: bytes | memoryview) -> Frame:
    """Check a whole frame's structure and both CRCs (FORMAT.md §6); the payload is not interpreted here."""
    header, table_at, payload_at = read_header(data)
    sections = _read_sections(data, table_at, payload_at)
    end = len(data) - _CRC.size
    (stored,) = _CRC.unpack_from(data, end)
    computed = crc32(memoryview(data)[payload_at:end])
    if stored != computed:
        raise FormatError("payload_crc32", end, stored, f"computed {computed:#010x}")
    return Frame(header, sections)


def check_identity(header: FrameHeader, layout: KVLayout, model_id: bytes) -> None:
    """Reject KV of another model or layout before decoding (DESIGN §10): a typed LayoutMismatch, not a crash."""
    if header.model_id != model_id:
        raise LayoutMismatch(f"frame is for model {header.model_id.hex()}, expected {model_id.hex()}")
    if header.layout != layout:
        raise LayoutMismatch(f"frame layout {header.layout} differs from expected {layout}")


def expect_sections(frame: Frame, kinds: Sequence[int], sizes: Sequence[int | None]) -> None:
    """A level's sections must be exactly ``kinds`` in order; ``sizes`` pins those whose size is implied."""
    got = tuple(s.kind for s in frame.sections)
    if got != tuple(kinds):
        raise FormatError("section.kind", HEADER_SIZE + len(frame.header.model_id), got, f"level needs {tuple(kinds)}")
    for index, (section, size) in enumerate(zip(frame.sections, sizes, strict=True)):
        if size is not None and section.size != size:
            at = HEADER_SIZE + len(frame.header.model_id) + index * SECTION_ENTRY_SIZE + 8
            raise FormatError("section.size", at, section.size, f"level needs {size} bytes")


def dtype_bytes(layout: KVLayout) -> int:
    return DTYPE_BYTES[layout.dtype]
