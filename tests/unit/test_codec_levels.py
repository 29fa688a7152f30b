"""Coded levels 1-9: calibration, exact lossless round trip, stated error bounds, typed errors on bad frames."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachegen.codec import calibrate, decode, encode, load_tables, quant
from cachegen.codec.bitstream import parse_frame
from cachegen.codec.levels import SCHEME_BY_LEVEL
from cachegen.errors import FormatError, InvalidRequest, LayoutMismatch
from cachegen.spec import LEVEL_BY_NAME, KVLayout
from tests.golden.make_golden import reseal
from tests.unit.codec_fixtures import tiny_transform

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16", tokens_per_chunk=32)
MODEL = b"model-fingerprint"
CODED = [level for level in sorted(SCHEME_BY_LEVEL)]


def make_kv(num_tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    kv = torch.randn(LAYOUT.shape(num_tokens), generator=generator)
    kv[:, 0, :, :, 3] *= 8  # a key outlier channel, as real models have
    return kv.bfloat16()


@pytest.fixture(scope="module")
def tables():
    samples = [make_kv(32, 1), make_kv(32, 2)]
    return calibrate(samples, LAYOUT, MODEL, transform=tiny_transform(samples, LAYOUT))


def test_tables_serialize_round_trip(tables) -> None:
    again = load_tables(tables.to_bytes())
    assert again.id == tables.id and again.to_bytes() == tables.to_bytes()
    with pytest.raises(FormatError):
        load_tables(tables.to_bytes()[:-9])


def test_lossless_is_bit_identical(tables) -> None:
    kv = make_kv(45, 3)  # one full 32-token stream block plus a 13-token tail block
    frame = encode(kv, LAYOUT, MODEL, LEVEL_BY_NAME["lossless"].id, tables=tables)
    assert torch.equal(decode(frame, LAYOUT, MODEL, tables=tables).view(torch.int16), kv.view(torch.int16))


@pytest.mark.parametrize(
    "level", [lv for lv in CODED if not (SCHEME_BY_LEVEL[lv].is_lossless or SCHEME_BY_LEVEL[lv].is_transform)]
)
def test_lossy_error_within_stated_bound(tables, level: int) -> None:
    kv = make_kv(45, 4)
    frame = encode(kv, LAYOUT, MODEL, level, tables=tables)
    back = decode(frame, LAYOUT, MODEL, tables=tables).float().numpy()
    values = kv.float().numpy()
    bins = SCHEME_BY_LEVEL[level].bins(LAYOUT.num_layers)
    bound = quant.error_bound(quant.token_scales(values), bins)[:, :, None, :, None]
    # half a quantizer step, plus the output's own bf16 rounding (half an ulp: 2^-8 relative)
    assert np.all(np.abs(back - values) <= bound + np.abs(back) * 2.0**-8 + 1e-6)


def test_levels_are_ordered_by_size(tables) -> None:
    """Levels 1-5 shrink with their id; levels 6-8 with their step (the cross-layer level has a basis of its own)."""
    kv = make_kv(64, 5)
    transform = [lv for lv in CODED if SCHEME_BY_LEVEL[lv].is_transform and not SCHEME_BY_LEVEL[lv].cross_layer]
    for family in ([lv for lv in CODED if not SCHEME_BY_LEVEL[lv].is_transform], transform):
        sizes = [len(encode(kv, LAYOUT, MODEL, level, tables=tables)) for level in family]
        assert sizes == sorted(sizes, reverse=True)


def test_all_zero_vector_has_no_nan(tables) -> None:
    kv = torch.zeros(LAYOUT.shape(4), dtype=torch.bfloat16)
    back = decode(encode(kv, LAYOUT, MODEL, LEVEL_BY_NAME["small"].id, tables=tables), LAYOUT, MODEL, tables=tables)
    assert torch.equal(back, kv)


def test_missing_or_foreign_tables_are_rejected(tables) -> None:
    kv = make_kv(8, 6)
    with pytest.raises(InvalidRequest):
        encode(kv, LAYOUT, MODEL, LEVEL_BY_NAME["q32"].id)
    frame = encode(kv, LAYOUT, MODEL, LEVEL_BY_NAME["q32"].id, tables=tables)
    other = calibrate([make_kv(32, 9)], LAYOUT, MODEL)
    with pytest.raises(LayoutMismatch):
        decode(frame, LAYOUT, MODEL, tables=other)
    with pytest.raises(LayoutMismatch):
        decode(frame, LAYOUT, MODEL)
    with pytest.raises(InvalidRequest):
        encode(kv.float().masked_fill(kv.float() > 1, float("inf")).bfloat16(), LAYOUT, MODEL, 3, tables=tables)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    level=st.sampled_from(CODED),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
)
def test_fuzzed_resealed_frames_give_typed_errors(tables, level: int, edits: list[tuple[int, int]]) -> None:
    frame = bytearray(encode(make_kv(40, 8), LAYOUT, MODEL, level, tables=tables))
    payload_at = parse_frame(bytes(frame)).sections[0].offset
    for position, xor in edits:
        frame[payload_at + position % (len(frame) - 4 - payload_at)] ^= xor
    try:
        out = decode(reseal(frame), LAYOUT, MODEL, tables=tables)
    except (FormatError, LayoutMismatch):
        return
    assert out.shape == LAYOUT.shape(40)  # a mutated scale can still decode: the shape must hold


def test_oversized_stream_count_is_rejected(tables) -> None:
    frame = bytearray(encode(make_kv(8, 10), LAYOUT, MODEL, LEVEL_BY_NAME["q32"].id, tables=tables))
    sizes = parse_frame(bytes(frame)).sections[-2]
    struct.pack_into("<I", frame, sizes.offset, 0xFFFFFFFF)
    with pytest.raises(FormatError) as info:
        decode(reseal(frame), LAYOUT, MODEL, tables=tables)
    assert info.value.field == "stream_sizes"


def test_sensitivity_shares_bins_out() -> None:
    """Measured sensitivity moves bins to the groups that cost most, as even counts in [4, 256]."""
    scheme = SCHEME_BY_LEVEL[LEVEL_BY_NAME["default"].id]
    sensitivity = np.array([[0.04, 0.002], [0.01, 0.0]])
    bins = scheme.bins(2, sensitivity)
    assert bins.dtype == np.uint16 and np.all(bins % 2 == 0) and bins.min() >= 4 and bins.max() <= 256
    assert bins[0, 0] > bins[1, 0] > bins[0, 1] >= bins[1, 1]
    assert np.array_equal(scheme.bins(2), SCHEME_BY_LEVEL[LEVEL_BY_NAME["default"].id].bins(2, None))


def test_calibrated_bins_drive_encode_and_decode() -> None:
    """Bins come from the tables (not the scheme): sensitivity-calibrated tables round-trip within their bound."""
    sensitivity = np.array([[0.05, 0.001], [0.002, 0.03]])
    tables = calibrate([make_kv(32, 1)], LAYOUT, MODEL, sensitivity)
    level = LEVEL_BY_NAME["small"].id
    bins = tables.for_level(level).bins
    assert not np.array_equal(bins, SCHEME_BY_LEVEL[level].bins(LAYOUT.num_layers))
    kv = make_kv(40, 6)
    back = decode(encode(kv, LAYOUT, MODEL, level, tables=tables), LAYOUT, MODEL, tables=tables).float().numpy()
    values = kv.float().numpy()
    bound = quant.error_bound(quant.token_scales(values), bins)[:, :, None, :, None]
    assert np.all(np.abs(back - values) <= bound + np.abs(back) * 2.0**-8 + 1e-6)


def test_tables_with_odd_bins_are_rejected(tables) -> None:
    entry = tables.for_level(LEVEL_BY_NAME["q32"].id)
    entry.bins[0, 0] = 31  # a hostile or corrupt tables file: re-serialized with a valid CRC
    try:
        with pytest.raises(FormatError, match="bins"):
            load_tables(tables.to_bytes())
    finally:
        entry.bins[0, 0] = 32
