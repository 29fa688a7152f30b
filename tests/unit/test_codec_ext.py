"""The C++ extension and the numpy reference path: identical bytes out, identical values back (STYLE §6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cachegen import spec
from cachegen.codec import _ext, calibrate, coded, decode, encode
from cachegen.codec.bitstream import HEADER_SIZE
from cachegen.codec.calibrate import lossless_map
from cachegen.codec.levels import SCHEME_BY_LEVEL
from cachegen.codec.quant import STREAM_TOKENS
from cachegen.codec.rans import PRECISION, Tables
from cachegen.codec.tables import LevelTables, freq_from_counts
from cachegen.errors import FormatError
from cachegen.spec import KVLayout
from tests.golden.make_golden import reseal
from tests.unit.codec_fixtures import assert_within_sum_rounding, tiny_transform

pytestmark = pytest.mark.skipif(not _ext.has_cpu(), reason="C++ extension not built (pip install -e .)")
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16", tokens_per_chunk=32)
MODEL = b"model-fingerprint"


def make_kv(num_tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(LAYOUT.shape(num_tokens), generator=generator) * 2).bfloat16()


@pytest.fixture(scope="module")
def tables():
    samples = [make_kv(32, 1), make_kv(32, 2)]
    return calibrate(samples, LAYOUT, MODEL, transform=tiny_transform(samples, LAYOUT))


def test_extension_constants_match_spec() -> None:
    assert _ext.constants() == {
        "MAGIC": int.from_bytes(spec.MAGIC, "little"),
        "FORMAT_VERSION": spec.FORMAT_VERSION,
        "PRECISION": PRECISION,
        "STREAM_TOKENS": STREAM_TOKENS,
        "HEADER_SIZE": HEADER_SIZE,
    }


@pytest.mark.parametrize("level", sorted(SCHEME_BY_LEVEL))
@pytest.mark.parametrize("num_tokens", [1, 32, 45])
def test_extension_and_reference_agree(tables, level: int, num_tokens: int) -> None:
    kv = make_kv(num_tokens, 3 + level)
    frame = encode(kv, LAYOUT, MODEL, level, tables=tables, backend="cpu")
    assert frame == encode(kv, LAYOUT, MODEL, level, tables=tables, backend="reference")
    fast = decode(frame, LAYOUT, MODEL, tables=tables, backend="auto")
    slow = decode(frame, LAYOUT, MODEL, tables=tables, backend="reference")
    if SCHEME_BY_LEVEL[level].is_transform:  # the extension's inverse transform against torch's
        assert_within_sum_rounding(fast, slow)
    else:
        assert torch.equal(fast.view(torch.int16), slow.view(torch.int16))


def test_extension_rejects_corrupt_streams(tables) -> None:
    frame = bytearray(encode(make_kv(40, 9), LAYOUT, MODEL, 3, tables=tables))
    frame[-40] ^= 0x10  # inside the words section
    with pytest.raises(FormatError):
        decode(reseal(frame), LAYOUT, MODEL, tables=tables, backend="auto")


@pytest.mark.parametrize("level", [1, 4])
def test_cuda_upload_staging_without_a_gpu(tables, level: int) -> None:
    """The host half of the CUDA path (offsets, one transfer of the small arrays, split back) needs no GPU: staged
    onto the CPU, every array must come back as the frame holds it."""
    from cachegen.codec.bitstream import parse_frame
    from cachegen.codec.decode import _payload

    frame = encode(make_kv(45, 5), LAYOUT, MODEL, level, tables=tables)
    view = memoryview(frame).cast("B")
    parsed = parse_frame(view)
    entry = tables.for_level(level)
    sizes, words, scales = _payload(view, parsed, LAYOUT, SCHEME_BY_LEVEL[level].is_lossless)
    fused = () if scales is None else (scales, entry.bins)
    shape = (LAYOUT.num_layers, 2, LAYOUT.num_kv_heads, 45, entry.table_map.shape[-1])
    batch = _ext.upload_cuda(words, sizes, entry, shape, fused, "cpu")
    assert np.array_equal(batch.words.numpy().view(np.uint32), words)
    assert np.array_equal(batch.sizes.numpy().view(np.uint32), sizes)
    assert batch.offsets.tolist() == [0, *np.cumsum(sizes.astype(np.int64))[:-1].tolist()]
    if fused:
        assert np.array_equal(batch.scales.numpy().view(np.uint16), scales.reshape(-1))
        assert np.array_equal(batch.bins.numpy().view(np.uint16), entry.bins.reshape(-1))
    table_map, cum, slots = batch.tables
    assert np.array_equal(table_map.numpy().view(np.uint32), entry.table_map)
    assert np.array_equal(cum.numpy().view(np.uint32), entry.tables.cum)
    assert np.array_equal(slots.numpy(), entry.slots)
    assert _ext.device_tables(entry, "cpu") is batch.tables  # uploaded once per model and device


def _skewed_level(layout: KVLayout, seed: int) -> LevelTables:
    """Lossless-shaped tables whose slots hold many symbols each (most frequencies 1, a few huge), so the decoder's
    lookup takes its rare multi-step path, next to ordinary peaked rows."""
    rng = np.random.default_rng(seed)
    table_map = lossless_map(layout)
    num_tables = int(table_map.max()) + 1
    weights = rng.pareto(0.7, (num_tables, 256)) + 1e-9
    weights[::2] = rng.exponential(1.0, (num_tables - num_tables // 2, 256)) ** 6  # peaked rows
    freq = freq_from_counts(weights)
    return LevelTables(1, np.zeros((layout.num_layers, 2), np.uint16), table_map, Tables(freq))


@pytest.mark.parametrize("head_dim", [16, 32])
@pytest.mark.parametrize("num_tokens", [31, 32, 45, 256, 300])
def test_lookup_matches_reference_on_skewed_tables(num_tokens: int, head_dim: int) -> None:
    """Every symbol of every row (rare tails included) decodes as the numpy reference says, whatever lane
    grouping the stream count gives (8, 4 and single lanes, short tail blocks); head_dim 32 makes the rows large
    enough for the decoder to prefetch them."""
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=head_dim, dtype="bfloat16", tokens_per_chunk=32)
    entry = _skewed_level(layout, num_tokens)
    rng = np.random.default_rng(num_tokens)
    shape = (layout.num_layers, 2, layout.num_kv_heads, num_tokens, entry.table_map.shape[-1])
    ids = np.broadcast_to(entry.table_map[:, :, :, None, :], shape)
    quantile = rng.integers(0, 1 << PRECISION, shape)  # symbols drawn by their own tables' probabilities
    symbols = _draw(entry, ids, quantile)
    sizes, words = coded.encode_symbols(symbols, entry)
    assert np.array_equal(_ext.encode_symbols(symbols, entry)[1], words)
    out, status, bad = _ext.decode(words, sizes, entry, shape, None)
    assert (status, bad) == (0, -1)
    assert np.array_equal(out, symbols)


def _draw(entry: LevelTables, ids: np.ndarray, quantile: np.ndarray) -> np.ndarray:
    flat_ids, flat_q = ids.reshape(-1), quantile.reshape(-1)
    out = np.empty(flat_ids.size, np.int32)
    for table in np.unique(flat_ids):
        where = flat_ids == table
        out[where] = np.searchsorted(entry.tables.cum[table], flat_q[where], side="right") - 1
    return out.reshape(ids.shape)


@pytest.mark.parametrize("seed", range(6))
def test_hostile_words_give_status_codes(tables, seed: int) -> None:
    """Random words (any 64-bit state, any refill pattern) and random stream sizes never crash or read out of
    range: each decode returns OK, a bad final state or a bad symbol, and sizes that do not add up say so."""
    rng = np.random.default_rng(seed)
    for entry in tables.levels:
        num_tokens = int(rng.choice([1, 32, 45, 256]))
        shape = (LAYOUT.num_layers, 2, LAYOUT.num_kv_heads, num_tokens, entry.table_map.shape[-1])
        streams = LAYOUT.num_layers * 2 * LAYOUT.num_kv_heads * -(-num_tokens // STREAM_TOKENS)
        sizes = rng.integers(0, 4, streams).astype(np.uint32) * rng.integers(0, 40, streams).astype(np.uint32)
        fill = [0, 0xFFFFFFFF, None][seed % 3]
        words = rng.integers(0, 1 << 32, int(sizes.sum()), dtype=np.uint64).astype(np.uint32)
        if fill is not None:
            words[::2] = fill
        scales = rng.integers(0, 1 << 16, (LAYOUT.num_layers, 2, num_tokens)).astype(np.uint16)
        fused = () if entry.quant_bins is None else (scales, entry.bins)
        for mode in (None, fused):
            _, status, bad = _ext.decode(words, sizes, entry, shape, mode)
            assert status in (0, 1, 3) and (status == 0) == (bad == -1)
        _, status, _ = _ext.decode(words[:-1] if words.size else np.ones(1, np.uint32), sizes, entry, shape, None)
        assert status == 2
