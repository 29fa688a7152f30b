"""rANS bit-compatible with constriction's ``AnsCoder`` (FORMAT.md §7), vectorized over many streams with numpy.

This is the reference coder: the C++ and CUDA cores must produce and accept exactly these words. Integer
arithmetic only: 64-bit state, 32-bit words, 24-bit probabilities; every table sums to 2^24 with every
frequency >= 1. Loops run over symbol positions; each step handles all streams at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cachegen.errors import FormatError

PRECISION = 24
TOTAL = 1 << PRECISION
_MASK24 = np.uint64(TOTAL - 1)
_MASK32 = np.uint64(0xFFFFFFFF)
_U24, _U32, _U40 = np.uint64(24), np.uint64(32), np.uint64(40)
_WORD_FLOOR = np.uint64(1 << 32)


@dataclass(slots=True, frozen=True)
class Tables:
    """``num_tables`` categorical models over the same ``alphabet``: ``freq[t, k]`` >= 1, each row sums to 2^24."""

    freq: np.ndarray  # (num_tables, alphabet) uint32
    cum: np.ndarray = field(init=False, repr=False, compare=False)
    """Exclusive prefix sums: ``cum[t, k]`` is the start of symbol k's range in table t. Derived once here: every
    encode and decode call reads it, and recomputing it cost ~10 ms per call for the 256-symbol levels."""

    def __post_init__(self) -> None:
        freq = self.freq
        if freq.ndim != 2 or freq.dtype != np.uint32:
            raise ValueError(f"freq must be 2-D uint32, got {freq.dtype} {freq.shape}")
        if freq.size and (freq.min() < 1 or np.any(freq.sum(axis=1, dtype=np.uint64) != TOTAL)):
            raise ValueError("every frequency must be >= 1 and every row must sum to 2^24")
        cum = np.zeros_like(freq)
        np.cumsum(freq[:, :-1], axis=1, out=cum[:, 1:])
        object.__setattr__(self, "cum", cum)


def encode_streams(symbols: np.ndarray, table_ids: np.ndarray, tables: Tables) -> tuple[np.ndarray, np.ndarray]:
    """Code ``symbols[s, j]`` (stream s, position j) with table ``table_ids[s, j]``; all streams one length.

    Returns ``(words, num_words)``: the streams' words concatenated (uint32, stream order, each stream in
    constriction's ``get_compressed()`` order) and each stream's word count. Decoding yields positions 0..n-1.
    """
    num_streams, length = symbols.shape
    freq, cum = tables.freq.astype(np.uint64), tables.cum.astype(np.uint64)
    state = np.zeros(num_streams, np.uint64)
    pushed = np.zeros((length + 2, num_streams), np.uint32)
    count = np.zeros(num_streams, np.int64)
    columns = np.arange(num_streams)
    for j in range(length - 1, -1, -1):  # a stack: encode backwards so the decoder pops forwards
        f = freq[table_ids[:, j], symbols[:, j]]
        is_full = (state >> _U40) >= f
        rows = count[is_full]
        pushed[rows, columns[is_full]] = (state[is_full] & _MASK32).astype(np.uint32)
        count += is_full
        state = np.where(is_full, state >> _U32, state)
        state = ((state // f) << _U24) | (cum[table_ids[:, j], symbols[:, j]] + state % f)
    return _finish(pushed, count, state)


def _finish(pushed: np.ndarray, count: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Append each final state low word then high word, dropping high zero words (constriction's rule)."""
    low, high = state & _MASK32, state >> _U32
    tail = np.where(high != 0, 2, np.where(low != 0, 1, 0))
    columns = np.arange(state.size)
    pushed[count, columns] = low.astype(np.uint32)
    pushed[count + 1, columns] = high.astype(np.uint32)
    num_words = count + tail
    keep = np.arange(pushed.shape[0])[:, None] < num_words[None, :]
    return pushed.T[keep.T].astype(np.uint32), num_words.astype(np.uint32)


def _slot_lookup(tables: Tables) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flattened, globally sorted cumulative starts so one searchsorted finds symbols in any table."""
    cum = tables.cum.astype(np.uint64)
    base = (np.arange(cum.shape[0], dtype=np.uint64) << _U24)[:, None]
    return (cum + base).ravel(), tables.freq.astype(np.uint64).ravel(), cum.ravel()


def decode_streams(words: np.ndarray, num_words: np.ndarray, table_ids: np.ndarray, tables: Tables) -> np.ndarray:
    """Inverse of ``encode_streams``; raises FormatError unless every stream ends in state 0 with no words left.

    ``words`` are untrusted: a bad stream yields wrong symbols in range (never an out-of-range index), and
    the final-state check rejects it. Offsets in errors are word indexes into the concatenated ``words``.
    """
    num_streams, length = table_ids.shape
    alphabet = tables.freq.shape[1]
    flat_cum, flat_freq, cum = _slot_lookup(tables)
    ends = np.cumsum(num_words.astype(np.int64))
    ptr, state = _initial_states(words, ends - num_words, ends)
    padded = np.concatenate([words.astype(np.uint64), np.zeros(1, np.uint64)])
    out = np.empty((num_streams, length), np.int32)
    starts = ends - num_words
    for j in range(length):
        quantile = state & _MASK24
        key = (table_ids[:, j].astype(np.uint64) << _U24) | quantile
        flat = np.searchsorted(flat_cum, key, side="right") - 1
        out[:, j] = flat - table_ids[:, j].astype(np.int64) * alphabet
        state = flat_freq[flat] * (state >> _U24) + quantile - cum[flat]
        needs = (state < _WORD_FLOOR) & (ptr > starts)
        ptr = ptr - needs
        state = np.where(needs, (state << _U32) | padded[np.where(needs, ptr, -1)], state)
    bad = np.flatnonzero((state != 0) | (ptr != starts))
    if bad.size:
        stream = int(bad[0])
        raise FormatError("rans_final_state", int(starts[stream]), int(state[stream]), f"stream {stream} is corrupt")
    return out


def _initial_states(words: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pop each stream's state: high word last, low word before it (one word alone is the whole state)."""
    padded = np.concatenate([words.astype(np.uint64), np.zeros(2, np.uint64)])
    size = ends - starts
    last = padded[np.where(size >= 1, ends - 1, -1)]
    second = padded[np.where(size >= 2, ends - 2, -1)]
    state = np.where(size >= 2, (last << _U32) | second, np.where(size == 1, last, 0)).astype(np.uint64)
    return ends - np.minimum(size, 2), state
