"""Coded levels 1-5: calibration, exact lossless round trip, stated error bounds, typed errors on bad frames."""

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
    return calibrate([make_kv(32, 1), make_kv(32, 2)], LAYOUT, MODEL)


def test_tables_serialize_round_trip(tables) -> None:
    again = load_tables(tables.to_bytes())
    assert again.id == tables.id and again.to_bytes() == tables.to_bytes()
    with pytest.raises(FormatError):
        load_tables(tables.to_bytes()[:-9])


def test_lossless_is_bit_identical(tables) -> None:
    kv = make_kv(45, 3)  # one full 32-token stream block plus a 13-token tail block
    frame = encode(kv, LAYOUT, MODEL, LEVEL_BY_NAME["lossless"].id, tables=tables)
    assert torch.equal(decode(frame, LAYOUT, MODEL, tables=tables).view(torch.int16), kv.view(torch.int16))


@pytest.mark.parametrize("level", [lv for lv in CODED if not SCHEME_BY_LEVEL[lv].is_lossless])
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
    kv = make_kv(64, 5)
    sizes = [len(encode(kv, LAYOUT, MODEL, level, tables=tables)) for level in CODED]
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
