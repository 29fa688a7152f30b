"""The AVX-512 decode lanes (kernels/cpu/lanes_avx512.h) against the portable ones and the numpy reference: the
same symbols, values, statuses and first bad stream, on every alphabet size the vector path takes and around it,
and on 255-symbol rows it takes through its register window (the transform levels' peaked rows)."""

from __future__ import annotations

import ctypes
import dataclasses
import mmap

import numpy as np
import pytest

from cachegen.codec import _ext, coded
from cachegen.codec.quant import STREAM_TOKENS
from cachegen.codec.rans import PRECISION, Tables
from cachegen.codec.tables import LevelTables, freq_from_counts
from cachegen.spec import KVLayout

pytestmark = pytest.mark.skipif(
    not _ext.has_simd_decode(), reason="needs a CPU with AVX-512 F/DQ/BW/VL/VBMI (the portable lanes decode here)"
)
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16", tokens_per_chunk=32)


def _level(alphabet: int, seed: int, per_token: int = 16) -> LevelTables:
    """Per-column tables of `alphabet` symbols: peaked rows, and heavy-tailed ones whose slots hold many symbols
    (the lookup's rare multi-step path)."""
    rng = np.random.default_rng(seed)
    cells = LAYOUT.num_layers * 2 * LAYOUT.num_kv_heads * per_token
    table_map = rng.permutation(cells).astype(np.uint32).reshape(LAYOUT.num_layers, 2, LAYOUT.num_kv_heads, per_token)
    weights = rng.pareto(0.7, (cells, alphabet)) + 1e-9
    weights[::2] = rng.exponential(1.0, (cells - cells // 2, alphabet)) ** 6
    bins = np.full((LAYOUT.num_layers, 2), 2 * ((alphabet + 1) // 2), np.uint16)
    return LevelTables(3, bins, table_map, Tables(freq_from_counts(weights)))


def _peaked_level(seed: int, spread: float = 2.0) -> LevelTables:
    """255-symbol rows like the transform levels' (FORMAT.md §5.5): Laplacian around the middle symbol 127 with
    per-row widths up to `spread` symbols, and every other symbol a pseudo-count, so slot 0 spans ~100 tail symbols
    and the top slot ~100 more: the register window's two ways out (a guess below it, a walk past its end)."""
    rng = np.random.default_rng(seed)
    cells = LAYOUT.num_layers * 2 * LAYOUT.num_kv_heads * 16
    table_map = rng.permutation(cells).astype(np.uint32).reshape(LAYOUT.num_layers, 2, LAYOUT.num_kv_heads, 16)
    width = rng.uniform(0.3, spread, (cells, 1))
    weights = np.exp(-np.abs(np.arange(255) - 127)[None, :] / width) * 1e5 + 0.05
    return LevelTables(7, np.full((LAYOUT.num_layers, 2), 256, np.uint16), table_map, Tables(freq_from_counts(weights)))


def _with_tails(symbols: np.ndarray, seed: int) -> np.ndarray:
    """`symbols` with ~1% replaced by symbols in and around the window's edges and in both tails."""
    rng = np.random.default_rng(seed)
    out = symbols.copy().reshape(-1)
    where = rng.random(out.size) < 0.01
    out[where] = rng.choice([0, 1, 40, 95, 96, 97, 156, 157, 158, 159, 160, 200, 253, 254], int(where.sum()))
    return out.reshape(symbols.shape)


def _draw(entry: LevelTables, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Symbols drawn by their own tables' probabilities."""
    ids = np.broadcast_to(entry.table_map[:, :, :, None, :], shape).reshape(-1)
    quantile = np.random.default_rng(seed).integers(0, 1 << PRECISION, ids.size)
    out = np.empty(ids.size, np.int32)
    for table in np.unique(ids):
        where = ids == table
        out[where] = np.searchsorted(entry.tables.cum[table], quantile[where], side="right") - 1
    return out.reshape(shape)


def _shape(entry: LevelTables, num_tokens: int) -> tuple[int, ...]:
    return (LAYOUT.num_layers, 2, LAYOUT.num_kv_heads, num_tokens, entry.table_map.shape[-1])


# 62: the largest alphabet whose bounds fit the vector path's registers; 63 and these spread 255-symbol rows take
# the portable lanes.
@pytest.mark.parametrize("alphabet", [2, 7, 31, 51, 62, 63, 255])
@pytest.mark.parametrize("num_tokens", [256, 300, 45 + 32 * 24])
def test_vector_lanes_decode_what_the_reference_encoded(alphabet: int, num_tokens: int) -> None:
    """256 tokens: one 8-block run per group (the groups' runs share vectors); 300 and 813: runs, then full blocks
    and a short tail block left to the portable lanes."""
    entry = _level(alphabet, alphabet + num_tokens)
    shape = _shape(entry, num_tokens)
    symbols = _draw(entry, shape, num_tokens)
    sizes, words = coded.encode_symbols(symbols, entry)
    for simd in (True, False):
        out, status, bad = _ext.decode(words, sizes, entry, shape, None, simd=simd)
        assert (status, bad) == (0, -1)
        assert np.array_equal(out, symbols)


@pytest.mark.parametrize("num_tokens", [256, 300, 45 + 32 * 24])
@pytest.mark.parametrize("seed", [0, 1])
def test_windowed_lanes_decode_peaked_255_symbol_rows(num_tokens: int, seed: int) -> None:
    """The vector path takes these rows (the check that it does is part of the test), drawn symbols and tail ones
    alike decode to what the reference encoded, on 1 and 3 threads."""
    entry = _peaked_level(seed)
    shape = _shape(entry, num_tokens)
    assert _ext.vector_lanes(entry, shape)
    symbols = _with_tails(_draw(entry, shape, seed), seed)
    sizes, words = coded.encode_symbols(symbols, entry)
    for simd, threads in ((True, 1), (True, 3), (False, 1)):
        out, status, bad = _ext.decode(words, sizes, entry, shape, None, threads, simd=simd)
        assert (status, bad) == (0, -1)
        assert np.array_equal(out, symbols)


def test_vector_lanes_take_the_rows_that_suit_them() -> None:
    """Rows of <= 62 symbols always; 255 symbols only when their window holds nearly all of the probability:
    not the wide rows q8 has (here: widths up to 60 symbols), nor spread or heavy-tailed ones."""
    shape = _shape(_level(62, 0), 256)
    assert _ext.vector_lanes(_level(62, 0), shape) and not _ext.vector_lanes(_level(63, 0), shape)
    assert _ext.vector_lanes(_peaked_level(0), shape)
    assert not _ext.vector_lanes(_peaked_level(0, spread=60.0), shape)
    assert not _ext.vector_lanes(_level(255, 0), shape)


@pytest.mark.parametrize("alphabet", [7, 31, 51])
@pytest.mark.parametrize("threads", [1, 3])
def test_vector_lanes_fuse_dequantization_like_the_portable_ones(alphabet: int, threads: int) -> None:
    entry = _level(alphabet, alphabet, per_token=LAYOUT.head_dim)
    shape = _shape(entry, 512)
    symbols = np.minimum(_draw(entry, shape, alphabet), int(entry.bins[0, 0]) - 2)  # every symbol a quantizer emits
    sizes, words = coded.encode_symbols(symbols, entry)
    rng = np.random.default_rng(alphabet)
    scales = rng.integers(0x3C00, 0x4400, (LAYOUT.num_layers, 2, 512)).astype(np.uint16)  # bf16 in [2^-7, 2^9)
    vector, status, _ = _ext.decode(words, sizes, entry, shape, (scales, entry.bins), threads, simd=True)
    portable, status_portable, _ = _ext.decode(words, sizes, entry, shape, (scales, entry.bins), threads, simd=False)
    assert status == status_portable == 0
    assert np.array_equal(vector, portable)


@pytest.mark.parametrize("seed", range(14))
def test_vector_lanes_fail_like_the_portable_ones(seed: int) -> None:
    """One stream's words flipped, cut or replaced by random ones: the same status and first bad stream (one
    thread, so "first" is well defined), and no read out of range either way. Seeds 8-13: windowed 255-symbol rows,
    where random words land in the tails (scalar lanes) often."""
    rng = np.random.default_rng(seed)
    entry = _level(int(rng.choice([5, 31, 62])), seed) if seed < 8 else _peaked_level(seed)
    shape = _shape(entry, 256)
    symbols = _draw(entry, shape, seed) if seed < 8 else _with_tails(_draw(entry, shape, seed), seed)
    sizes, words = coded.encode_symbols(symbols, entry)
    sizes, words = sizes.copy(), words.copy()
    stream = int(rng.integers(sizes.size))
    start = int(sizes[:stream].sum())
    if seed % 3 == 0:
        words[start + int(rng.integers(sizes[stream]))] ^= np.uint32(1 << int(rng.integers(32)))
    elif seed % 3 == 1:
        words = np.delete(words, start)
        sizes[stream] -= 1
    else:
        words[start : start + sizes[stream]] = rng.integers(0, 1 << 32, int(sizes[stream]), dtype=np.uint64)
    results = [_ext.decode(words, sizes, entry, shape, None, simd=simd) for simd in (True, False)]
    (vector, status, bad), (portable, status_portable, bad_portable) = results
    assert (status, bad) == (status_portable, bad_portable)
    # Small alphabets catch every one of these; on peaked rows a cut word can leave a clean final state and other
    # symbols (seeds 10 and 13), which the frame's payload CRC catches (FORMAT.md §6): the two paths agree anyway.
    assert status != 0 or seed in (10, 13)
    good = np.ones(shape[:3] + (shape[3] // STREAM_TOKENS,), bool).reshape(-1)
    if bad >= 0:
        good[bad] = False  # every other stream decodes the same either way
    blocks = vector.reshape(-1, STREAM_TOKENS * shape[4])[good]
    assert np.array_equal(blocks, portable.reshape(-1, STREAM_TOKENS * shape[4])[good])


def _before_guard_page(array: np.ndarray) -> tuple[np.ndarray, mmap.mmap]:
    """A copy of `array` that ends where an inaccessible page begins: a read one byte past its end faults. Returns
    the copy and the mapping that must outlive it."""
    page = mmap.PAGESIZE
    pages = -(-array.nbytes // page) + 1
    mapping = mmap.mmap(-1, pages * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mprotect(ctypes.c_void_p(base + (pages - 1) * page), ctypes.c_size_t(page), 0) == 0  # PROT_NONE
    start = (pages - 1) * page - array.nbytes
    copy = np.frombuffer(mapping, np.uint8, array.nbytes, start).view(array.dtype).reshape(array.shape)
    copy[...] = array
    return copy, mapping


@pytest.mark.parametrize("alphabet", [31, 51, 62, 255])
def test_vector_lanes_read_no_byte_past_the_lookup_rows(alphabet: int) -> None:
    """The vector path loads whole rows into registers (masked past alphabet + 2 bounds), or a 255-symbol row's
    window of them: with the slots and bounds each ending at an inaccessible page, every table (the last one
    included) decodes without a fault."""
    entry = _level(alphabet, alphabet) if alphabet < 255 else _peaked_level(alphabet)
    shape = _shape(entry, 256)
    symbols = _draw(entry, shape, alphabet) if alphabet < 255 else _with_tails(_draw(entry, shape, 3), 3)
    assert _ext.vector_lanes(entry, shape)
    sizes, words = coded.encode_symbols(symbols, entry)
    slots, _slots_map = _before_guard_page(entry.slots)
    bounds, _bounds_map = _before_guard_page(entry.bounds)
    guarded = dataclasses.replace(entry)
    object.__setattr__(guarded, "slots", slots)
    object.__setattr__(guarded, "bounds", bounds)
    out, status, _ = _ext.decode(words, sizes, guarded, shape, None, simd=True)
    assert status == 0 and np.array_equal(out, symbols)
    del slots, bounds, out
