"""Per-token table shifts in the C++ coder (LevelDesc::token_shift): the symbol at (l, kv, h, t, c) uses table
table_map[l, kv, h, c] + token_shift[l, t]. Words must equal the numpy reference coder given those table ids
(rans.encode_streams, FORMAT.md §5.3 stream order and §7), decoding must invert them, and the binding must
refuse any shift that would index a table that does not exist."""

from __future__ import annotations

import numpy as np
import pytest

from cachegen.codec import _ext, rans
from cachegen.codec.quant import STREAM_TOKENS
from cachegen.codec.rans import PRECISION, Tables
from cachegen.codec.tables import LevelTables, freq_from_counts

pytestmark = pytest.mark.skipif(not _ext.has_cpu(), reason="C++ extension not built (pip install -e .)")
LAYERS, HEADS, PER_TOKEN, ALPHABET, NUM_TABLES = 2, 2, 16, 255, 40
MAX_SHIFT = 8  # table_map entries lie in [MAX_SHIFT, NUM_TABLES - MAX_SHIFT), so shifts in [-8, 8] stay in range


def _level(seed: int) -> LevelTables:
    """Random skewed tables (peaked and flat rows) and a random table_map leaving room for shifts of +-8."""
    rng = np.random.default_rng(seed)
    weights = rng.random((NUM_TABLES, ALPHABET)) ** rng.uniform(1, 12, (NUM_TABLES, 1)) + 1e-9
    table_map = rng.integers(MAX_SHIFT, NUM_TABLES - MAX_SHIFT, (LAYERS, 2, HEADS, PER_TOKEN)).astype(np.uint32)
    return LevelTables(8, np.zeros((LAYERS, 2), np.uint16), table_map, Tables(freq_from_counts(weights)))


def _table_ids(entry: LevelTables, shift: np.ndarray) -> np.ndarray:
    """(L, 2, H, T, P) table of every symbol: table_map[l, kv, h, c] + token_shift[l, t]."""
    return entry.table_map[:, :, :, None, :].astype(np.int64) + shift[:, None, None, :, None].astype(np.int64)


def _draw(entry: LevelTables, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Symbols drawn by their own tables' probabilities (realistic word counts)."""
    quantile, flat = rng.integers(0, 1 << PRECISION, ids.size), ids.reshape(-1)
    out = np.empty(flat.size, np.int32)
    for table in np.unique(flat):
        where = flat == table
        out[where] = np.searchsorted(entry.tables.cum[table], quantile[where], side="right") - 1
    return out.reshape(ids.shape)


def _reference(symbols: np.ndarray, ids: np.ndarray, tables: Tables) -> tuple[np.ndarray, np.ndarray]:
    """(sizes, words) of the numpy coder with explicit per-position table ids, streams ordered by group, block."""
    groups, num_tokens = int(np.prod(symbols.shape[:3])), symbols.shape[3]
    symbols, ids = symbols.reshape(groups, num_tokens, -1), ids.reshape(groups, num_tokens, -1)
    sizes, words = [], []
    for group in range(groups):
        for first in range(0, num_tokens, STREAM_TOKENS):
            block = slice(first, first + STREAM_TOKENS)
            w, n = rans.encode_streams(symbols[group, block].reshape(1, -1), ids[group, block].reshape(1, -1), tables)
            sizes.append(n)
            words.append(w)
    return np.concatenate(sizes), np.concatenate(words)


def _case(num_tokens: int, seed: int) -> tuple[LevelTables, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    entry = _level(seed)
    shift = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, (LAYERS, num_tokens)).astype(np.int8)
    return entry, shift, _draw(entry, _table_ids(entry, shift), rng)


def _assert_rejected(entry: LevelTables, symbols: np.ndarray, shift: np.ndarray) -> None:
    """Both coders refuse ``shift`` with a ValueError naming token_shift (words: a valid frame's)."""
    sizes, words = _ext.encode_symbols(symbols, entry)
    with pytest.raises(ValueError, match="token_shift"):
        _ext.encode_symbols(symbols, entry, token_shift=shift)
    with pytest.raises(ValueError, match="token_shift"):
        _ext.decode(words, sizes, entry, symbols.shape, None, token_shift=shift)


def test_feature_flag() -> None:
    assert _ext.has_token_shift()


# 1: one short block; 45: tail only; 64, 128: full blocks only; 300: 4 lanes + 1 + tail; 600: 8 lanes + 1 + tail
@pytest.mark.parametrize("num_tokens", [1, 45, 64, 128, 300, 600])
def test_words_match_reference_and_decode_back(num_tokens: int) -> None:
    entry, shift, symbols = _case(num_tokens, num_tokens)
    sizes, words = _ext.encode_symbols(symbols, entry, token_shift=shift)
    ref_sizes, ref_words = _reference(symbols, _table_ids(entry, shift), entry.tables)
    assert np.array_equal(sizes, ref_sizes)
    assert np.array_equal(words, ref_words)
    threaded = _ext.encode_symbols(symbols, entry, num_threads=2, token_shift=shift)
    assert np.array_equal(threaded[0], sizes) and np.array_equal(threaded[1], words)
    for num_threads in (1, 2):
        out, status, bad = _ext.decode(words, sizes, entry, symbols.shape, None, num_threads, token_shift=shift)
        assert (status, bad) == (0, -1)
        assert np.array_equal(out, symbols)


def test_zero_shift_gives_the_unshifted_words() -> None:
    entry, _, _ = _case(300, 7)
    symbols = _draw(entry, _table_ids(entry, np.zeros((LAYERS, 300), np.int8)), np.random.default_rng(7))
    plain = _ext.encode_symbols(symbols, entry)
    shifted = _ext.encode_symbols(symbols, entry, token_shift=np.zeros((LAYERS, 300), np.int8))
    assert np.array_equal(plain[0], shifted[0]) and np.array_equal(plain[1], shifted[1])


def test_decoding_without_the_shift_differs() -> None:
    """The shift is honoured on both sides: the unshifted decoder does not reproduce the symbols."""
    entry, shift, symbols = _case(128, 3)
    sizes, words = _ext.encode_symbols(symbols, entry, token_shift=shift)
    out, status, _ = _ext.decode(words, sizes, entry, symbols.shape, None)
    assert status != 0 or not np.array_equal(out, symbols)


@pytest.mark.parametrize("bad", ["low", "high"])
def test_out_of_range_shift_raises(bad: str) -> None:
    entry, shift, symbols = _case(100, 11)
    # the smallest map entry of layer 1 plus -128 is below 0; its largest plus 127 is past the last table
    shift[1, 77] = -128 if bad == "low" else 127
    _assert_rejected(entry, symbols, shift)


def test_shift_at_the_table_bounds_is_accepted() -> None:
    """Shifts that reach exactly table 0 and table num_tables - 1 are valid."""
    entry, shift, _ = _case(64, 5)
    layer_map = entry.table_map[0].astype(np.int64)
    shift[0, 0] = -layer_map.min()
    shift[0, 1] = NUM_TABLES - 1 - layer_map.max()
    symbols = _draw(entry, _table_ids(entry, shift), np.random.default_rng(5))
    sizes, words = _ext.encode_symbols(symbols, entry, token_shift=shift)
    out, status, _ = _ext.decode(words, sizes, entry, symbols.shape, None, token_shift=shift)
    assert status == 0 and np.array_equal(out, symbols)


def test_wrong_shift_shape_or_dtype_raises() -> None:
    entry, shift, symbols = _case(64, 2)
    for bad in (shift[:, :-1], shift.T.copy(), shift.astype(np.int16)):
        _assert_rejected(entry, symbols, bad)


def test_binding_checks_shift_size() -> None:
    """The extension itself rejects a short or long shift buffer (a caller bypassing _ext's checks)."""
    entry, shift, symbols = _case(64, 4)
    args, table_map, freq, cum = _ext._desc(entry, symbols.shape)
    for bad in (shift.reshape(-1)[:-1], np.zeros(shift.size + 1, np.int8)):
        with pytest.raises(ValueError, match="token_shift size"):
            _ext._CPU.encode_symbols(args, table_map, freq, cum, symbols, 1, bad)


def test_fused_decode_with_shift_raises() -> None:
    entry, shift, symbols = _case(64, 6)
    sizes, words = _ext.encode_symbols(symbols, entry, token_shift=shift)
    with pytest.raises(ValueError, match="fused"):
        _ext.decode(words, sizes, entry, symbols.shape, (), token_shift=shift)
    args, table_map, freq, cum = _ext._desc(entry, symbols.shape)
    out = np.empty(symbols.shape[:4] + (PER_TOKEN // 2,), np.uint16)
    with pytest.raises(ValueError, match="symbols only"):  # the extension's own check, bypassing _ext
        _ext._CPU.decode(args, table_map, freq, cum, entry.slots, entry.bounds, words, sizes, None, None, out, 1, 1,
                         shift)  # fmt: skip


@pytest.mark.parametrize("seed", range(4))
def test_hostile_words_with_shift_give_status_codes(seed: int) -> None:
    """Random words and sizes with valid shifts never crash: OK, bad final state or bad sizes."""
    rng = np.random.default_rng(seed)
    num_tokens = int(rng.choice([1, 45, 300, 600]))
    entry, shift, symbols = _case(num_tokens, seed)
    streams = LAYERS * 2 * HEADS * -(-num_tokens // STREAM_TOKENS)
    sizes = (rng.integers(0, 4, streams) * rng.integers(0, 40, streams)).astype(np.uint32)
    words = rng.integers(0, 1 << 32, int(sizes.sum()), dtype=np.uint64).astype(np.uint32)
    _, status, bad = _ext.decode(words, sizes, entry, symbols.shape, None, token_shift=shift)
    assert status in (0, 1) and (status == 0) == (bad == -1)
    _, status, _ = _ext.decode(np.append(words, np.uint32(1)), sizes, entry, symbols.shape, None, token_shift=shift)
    assert status == 2
