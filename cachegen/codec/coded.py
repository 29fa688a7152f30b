"""Levels 1.. (FORMAT.md §5.2-§5.4): symbols, streams and sections of the rANS-coded levels, numpy reference path."""

from __future__ import annotations

import numpy as np

from cachegen.codec import quant, rans
from cachegen.codec.bitstream import Frame, expect_sections
from cachegen.codec.levels import Scheme
from cachegen.codec.tables import LevelTables
from cachegen.errors import FormatError
from cachegen.spec import KVLayout

SECTION_TABLES_ID, SECTION_SCALES, SECTION_STREAM_SIZES, SECTION_WORDS, SECTION_ESCAPES = 2, 3, 4, 5, 6
SECTION_TOKEN_CLASSES = 7


def num_blocks(num_tokens: int) -> int:
    return -(-num_tokens // quant.STREAM_TOKENS)


def _block_spans(num_tokens: int) -> list[tuple[int, int, int]]:
    """(first token, tokens per block, blocks) of the full blocks, then of the tail block if any."""
    full = num_tokens // quant.STREAM_TOKENS
    spans = [(0, quant.STREAM_TOKENS, full)] if full else []
    if num_tokens % quant.STREAM_TOKENS:
        spans.append((full * quant.STREAM_TOKENS, num_tokens % quant.STREAM_TOKENS, 1))
    return spans


def table_ids(table_map: np.ndarray, token_shift: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """Table of every symbol (L, 2, H, T, P): ``table_map[layer, kv, head, position]`` (FORMAT.md §5.3), plus
    ``token_shift[layer, token]`` (L, T) on the token-adaptive level (§5.6)."""
    ids = np.broadcast_to(table_map[:, :, :, None, :].astype(np.int64), shape)
    return ids if token_shift is None else ids + token_shift.astype(np.int64)[:, None, None, :, None]


def _block_ids(ids: np.ndarray, first: int, block_tokens: int, blocks: int) -> np.ndarray:
    """(groups * blocks, block_tokens * P) rows of ``ids`` (groups, T, P) for the blocks from token ``first``."""
    return ids[:, first : first + block_tokens * blocks].reshape(ids.shape[0] * blocks, -1)


def encode_symbols(
    symbols: np.ndarray, level: LevelTables, token_shift: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """rANS-code (L, 2, H, T, P) symbols; returns (num_words per stream, words) in FORMAT.md §5.3 order:
    streams by (layer, K|V, head, token block), the short tail block last within its head."""
    groups = int(np.prod(symbols.shape[:3]))
    per_group = symbols.reshape(groups, symbols.shape[3], -1)
    pieces: list[list[np.ndarray]] = [[] for _ in range(groups)]
    sizes: list[list[np.ndarray]] = [[] for _ in range(groups)]
    ids = table_ids(level.table_map, token_shift, symbols.shape).reshape(groups, symbols.shape[3], -1)
    for first, block, blocks in _block_spans(symbols.shape[3]):
        part = _block_ids(per_group, first, block, blocks)
        words, counts = rans.encode_streams(part, _block_ids(ids, first, block, blocks), level.tables)
        split = np.split(words, np.cumsum(counts.astype(np.int64))[:-1])
        for stream, chunk in enumerate(split):
            pieces[stream // blocks].append(chunk)
        for group in range(groups):
            sizes[group].append(counts[group * blocks : (group + 1) * blocks])
    all_words = [w for group in pieces for w in group]
    return np.concatenate([s for group in sizes for s in group]).astype(np.uint32), np.concatenate(all_words)


def decode_symbols(
    sizes: np.ndarray, words: np.ndarray, level: LevelTables, shape: tuple, token_shift: np.ndarray | None = None
) -> np.ndarray:
    """Inverse of ``encode_symbols`` for symbols of ``shape`` (L, 2, H, T, P); FormatError on a bad stream."""
    groups, num_tokens = int(np.prod(shape[:3])), shape[3]
    spans = _block_spans(num_tokens)
    per_group = sum(blocks for _, _, blocks in spans)
    starts = np.concatenate([[0], np.cumsum(sizes.astype(np.int64))])[:-1].reshape(groups, per_group)
    counts = sizes.reshape(groups, per_group)
    out = np.empty((groups, num_tokens, shape[4]), np.int32)
    ids = table_ids(level.table_map, token_shift, shape).reshape(groups, num_tokens, -1)
    column = 0
    for first, block, blocks in spans:
        part_starts = starts[:, column : column + blocks].ravel()
        part_counts = counts[:, column : column + blocks].ravel()
        gathered = np.concatenate([words[a : a + n] for a, n in zip(part_starts, part_counts, strict=True)])
        symbols = rans.decode_streams(gathered, part_counts, _block_ids(ids, first, block, blocks), level.tables)
        out[:, first : first + block * blocks] = symbols.reshape(groups, block * blocks, shape[4])
        column += blocks
    return out.reshape(shape)


def check_sections(frame: Frame, layout: KVLayout, scheme: Scheme) -> None:
    """Section kinds of a coded frame and the sizes they must have (FORMAT.md §5.4, §5.5)."""
    header = frame.header
    streams = layout.num_layers * 2 * layout.num_kv_heads * num_blocks(header.num_tokens)
    if scheme.is_transform:  # the ESCAPES size depends on its own count: transform_frame checks it
        middle: list[tuple[int, int | None]] = [(SECTION_ESCAPES, None)]
        if scheme.token_adaptive:
            middle.append((SECTION_TOKEN_CLASSES, (layout.num_layers * header.num_tokens + 1) // 2))
    else:
        middle = [] if scheme.is_lossless else [(SECTION_SCALES, layout.num_layers * 2 * header.num_tokens * 2)]
    pairs = [(SECTION_TABLES_ID, 16), *middle, (SECTION_STREAM_SIZES, 4 * streams), (SECTION_WORDS, None)]
    expect_sections(frame, [kind for kind, _ in pairs], [size for _, size in pairs])


def check_symbol_range(symbols: np.ndarray, bins: np.ndarray, offset: int) -> None:
    """A stream that decodes cleanly can still carry a symbol no quantizer emits (a freq-1 slot): reject it."""
    limit = (bins.astype(np.int64) - 2)[:, :, None, None, None]
    if np.any(symbols > limit):
        raise FormatError("symbol", offset, int(symbols.max()), "above bins - 2 for its layer")
