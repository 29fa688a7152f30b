"""The AVX-512 decode lanes (kernels/cpu/lanes_avx512.h) against the portable ones and the numpy reference: the
same symbols, values, statuses and first bad stream, on every alphabet size the vector path takes and around it."""

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


# 62: the largest alphabet whose bounds fit the vector path's registers; 63 and 255 take the portable lanes.
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


@pytest.mark.parametrize("seed", range(8))
def test_vector_lanes_fail_like_the_portable_ones(seed: int) -> None:
    """One stream's words flipped, cut or replaced by random ones: the same status and first bad stream (one
    thread, so "first" is well defined), and no read out of range either way."""
    rng = np.random.default_rng(seed)
    entry = _level(int(rng.choice([5, 31, 62])), seed)
    shape = _shape(entry, 256)
    symbols = _draw(entry, shape, seed)
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
    assert status != 0 and (status, bad) == (status_portable, bad_portable)
    good = np.ones(shape[:3] + (shape[3] // STREAM_TOKENS,), bool).reshape(-1)
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


@pytest.mark.parametrize("alphabet", [31, 51, 62])
def test_vector_lanes_read_no_byte_past_the_lookup_rows(alphabet: int) -> None:
    """The vector path loads whole rows into registers (masked past alphabet + 2 bounds): with the slots and
    bounds each ending at an inaccessible page, every table (the last one included) decodes without a fault."""
    entry = _level(alphabet, alphabet)
    shape = _shape(entry, 256)
    symbols = _draw(entry, shape, alphabet)
    sizes, words = coded.encode_symbols(symbols, entry)
    slots, _slots_map = _before_guard_page(entry.slots)
    bounds, _bounds_map = _before_guard_page(entry.bounds)
    guarded = dataclasses.replace(entry)
    object.__setattr__(guarded, "slots", slots)
    object.__setattr__(guarded, "bounds", bounds)
    out, status, _ = _ext.decode(words, sizes, guarded, shape, None, simd=True)
    assert status == 0 and np.array_equal(out, symbols)
    del slots, bounds, out
