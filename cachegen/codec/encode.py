"""``encode``: one KV chunk to one frame (FORMAT.md). Synchronous and pure; CPU tensors or CUDA (copied to host)."""

from __future__ import annotations

import torch

from cachegen.codec import _ext, coded, cross_layer, token_classes, transform
from cachegen.codec.bitstream import MAX_FRAME_TOKENS, MAX_MODEL_ID_BYTES, FrameHeader, pack_frame
from cachegen.codec.calibrate import symbols_of
from cachegen.codec.levels import SCHEME_BY_LEVEL
from cachegen.codec.raw import encode_raw
from cachegen.codec.tables import CodecTables, LevelTables
from cachegen.codec.tensors import check_kv, kv_bits
from cachegen.codec.transform_frame import escapes_payload
from cachegen.errors import InvalidRequest, LayoutMismatch
from cachegen.spec import LEVELS, RAW_LEVEL, KVLayout

_LEVEL_IDS = frozenset(level.id for level in LEVELS)
Sections = list[tuple[int, bytes | memoryview]]


def encode(
    kv: torch.Tensor,
    layout: KVLayout,
    model_id: bytes,
    level: int = 0,
    token_start: int = 0,
    *,
    tables: CodecTables | None = None,
    backend: str = "auto",
) -> bytes:
    """Code ``kv`` of shape ``layout.shape(num_tokens)`` = (layers, 2, kv_heads, tokens, head_dim) into a frame.

    ``level`` (a ``cachegen.spec.LEVELS`` id) changes the bitstream; ``token_start`` (position of the first token
    in its context) is recorded in the header. Levels >= 1 need ``tables`` from ``cachegen calibrate`` for this
    model and layout (changes the bitstream: the frame names the tables by id). Raises ``LayoutMismatch`` when
    ``kv`` or ``tables`` do not match ``layout`` / ``model_id``, ``InvalidRequest`` for bad arguments.
    ``backend`` ("auto", "cpu" = C++ extension, "reference" = numpy) affects runtime only: the bytes are identical.
    """
    num_tokens = check_kv(kv, layout)
    _check_arguments(model_id, level, token_start, num_tokens)
    header = FrameHeader(level, layout, bytes(model_id), token_start, num_tokens)
    if level == RAW_LEVEL.id:
        return pack_frame(header, encode_raw(kv_bits(kv)))
    entry = _level_tables(tables, layout, model_id, level)
    assert tables is not None  # _level_tables raised otherwise
    return pack_frame(header, _coded_sections(kv, entry, tables, token_start, _use_ext(backend)))


def _level_tables(tables: CodecTables | None, layout: KVLayout, model_id: bytes, level: int) -> LevelTables:
    if tables is None:
        raise InvalidRequest(f"level {level} needs calibrated tables (cachegen calibrate)")
    if tables.layout != layout or tables.model_id != bytes(model_id):
        raise LayoutMismatch(f"tables are for {tables.model_id.hex()} {tables.layout}, not this model/layout")
    entry = tables.for_level(level)
    if entry is None:
        raise InvalidRequest(f"tables {tables.id.hex()} have no level {level} (lossless needs a 16-bit dtype)")
    return entry


def _use_ext(backend: str) -> bool:
    if backend not in ("auto", "cpu", "reference"):
        raise InvalidRequest(f"unknown codec backend {backend!r}")
    if backend == "cpu" and not _ext.has_cpu():
        raise InvalidRequest("the C++ codec extension is not built (pip install -e .)")
    return backend != "reference" and _ext.has_cpu()


def _coded_sections(
    kv: torch.Tensor, entry: LevelTables, tables: CodecTables, token_start: int, use_ext: bool
) -> Sections:
    """Sections of a coded frame (FORMAT.md §5.4, §5.5): tables id, [scales | escapes], stream sizes, words."""
    scheme = SCHEME_BY_LEVEL[entry.level]
    if not scheme.is_lossless and not bool(torch.isfinite(kv).all()):
        raise InvalidRequest("lossy levels need finite KV values (found inf or NaN)")
    sections: Sections = [(coded.SECTION_TABLES_ID, tables.id)]
    shift = None
    if scheme.is_transform:
        assert tables.transform is not None  # for_level() offers transform levels only with a transform
        if scheme.token_adaptive and tables.transform.probe is None:
            raise InvalidRequest(f"tables {tables.id.hex()} have no probe: level {entry.level} cannot be encoded")
        if scheme.cross_layer:
            symbols, escaped, classes = (*cross_layer.quantize(kv, tables.transform, entry.level, token_start), None)
        else:
            symbols, escaped, classes = transform.quantize(
                kv, tables.transform, entry.level, token_start, scheme.token_adaptive
            )
        sections.append((coded.SECTION_ESCAPES, escapes_payload(kv, escaped)))
        if classes is not None:
            sections.append((coded.SECTION_TOKEN_CLASSES, token_classes.pack(classes)))
            shift = token_classes.SHIFTS[classes]
        scales = None
    else:
        symbols, scales = symbols_of(kv, entry.quant_bins)
    if use_ext:
        sizes, words = _ext.encode_symbols(symbols, entry, token_shift=shift)
    else:
        sizes, words = coded.encode_symbols(symbols, entry, shift)
    if scales is not None:
        sections.append((coded.SECTION_SCALES, scales.astype("<u2").tobytes()))
    sections.append((coded.SECTION_STREAM_SIZES, sizes.astype("<u4").tobytes()))
    sections.append((coded.SECTION_WORDS, words.astype("<u4").tobytes()))
    return sections


def _check_arguments(model_id: bytes, level: int, token_start: int, num_tokens: int) -> None:
    if level not in _LEVEL_IDS:
        raise InvalidRequest(f"unknown level {level}; known {sorted(_LEVEL_IDS)}")
    if not 1 <= len(model_id) <= MAX_MODEL_ID_BYTES:
        raise InvalidRequest(f"model_id must be 1..{MAX_MODEL_ID_BYTES} bytes, got {len(model_id)}")
    if not 1 <= num_tokens <= MAX_FRAME_TOKENS:
        raise InvalidRequest(f"a frame holds 1..{MAX_FRAME_TOKENS} tokens, got {num_tokens}")
    if not 0 <= token_start <= 0xFFFFFFFF - num_tokens:
        raise InvalidRequest(f"token_start {token_start} out of range for {num_tokens} tokens")
