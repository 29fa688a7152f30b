"""The token-adaptive transform level 8 (FORMAT.md §5.6, §8.2): classes, ladder tables, probe, hostile input."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from cachegen.codec import decode, encode, load_tables, token_classes
from cachegen.codec.bitstream import parse_frame
from cachegen.codec.tables import CodecTables
from cachegen.codec.transform import Transform
from cachegen.codec.transform_frame import read_classes
from cachegen.errors import FormatError, InvalidRequest, LayoutMismatch
from cachegen.spec import LEVEL_BY_NAME, KVLayout
from tests.golden.make_golden import reseal
from tests.unit.codec_fixtures import frame_bound, outlier_kv, tiny_tables

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16", tokens_per_chunk=32)
MODEL = b"model-fingerprint"
PCA2T = LEVEL_BY_NAME["pca2t"].id


def make_kv(num_tokens: int, seed: int) -> torch.Tensor:
    return outlier_kv(LAYOUT, num_tokens, seed)


@pytest.fixture(scope="module")
def tables():
    return tiny_tables(LAYOUT, MODEL)


def test_class_constants_are_what_the_format_lists() -> None:
    assert token_classes.MULTIPLIERS[token_classes.NEUTRAL] == 1.0 and token_classes.SHIFTS[8] == 0
    assert token_classes.MULTIPLIERS[10] == 2.0 and token_classes.MULTIPLIERS[0] == 2.0**-4
    assert token_classes.SHIFTS[0] == 16 and token_classes.SHIFTS[15] == -14
    assert token_classes.MAP_RANGE == (16, 81)


@pytest.mark.parametrize("layers, tokens", [(2, 5), (3, 4), (1, 1)])
def test_classes_pack_to_nibbles_and_back(layers: int, tokens: int) -> None:
    classes = np.random.default_rng(0).integers(0, 16, (layers, tokens))
    data = token_classes.pack(classes)
    assert len(data) == (layers * tokens + 1) // 2
    assert np.array_equal(token_classes.unpack(data, layers, tokens, 0), classes)
    assert data[0] == classes.ravel()[0] | (classes.ravel()[1] << 4 if classes.size > 1 else 0)  # low nibble first


def test_bad_class_sections_are_rejected() -> None:
    with pytest.raises(FormatError):
        token_classes.unpack(bytes(2), 1, 5, 0)  # 5 nibbles need 3 bytes
    with pytest.raises(FormatError):
        token_classes.unpack(bytes([0x11, 0x11, 0x71]), 1, 5, 0)  # the padding nibble must be 0


@pytest.mark.parametrize("token_start", [0, 1000])
def test_round_trip_within_each_tokens_bound(tables, token_start: int) -> None:
    kv = make_kv(45, 4)
    kv[:, :, :, 20] *= 60  # a token the neutral step cannot hold: a coarser class takes it, not the raw path
    frame = encode(kv, LAYOUT, MODEL, PCA2T, token_start, tables=tables)
    classes = read_classes(memoryview(frame), parse_frame(memoryview(frame)), LAYOUT)
    assert len(np.unique(classes)) > 1  # the probe spreads tokens over classes
    assert classes[:, 20].min() > token_classes.NEUTRAL
    back = decode(frame, LAYOUT, MODEL, tables=tables)
    err = (back.float() - kv.float()).abs().numpy()
    bound = frame_bound(tables, frame, LAYOUT)
    ok = err <= bound * (1 + 1e-4) + np.abs(back.float().numpy()) * 2.0**-8 + 1e-5
    assert np.all(ok[:, :, :, 4 if token_start == 0 else 0 :])
    if token_start == 0:
        assert torch.equal(back[:, :, :, :4], kv[:, :, :, :4])  # sinks raw
    reference = encode(kv, LAYOUT, MODEL, PCA2T, token_start, tables=tables, backend="reference")
    assert reference == frame
    assert torch.equal(decode(frame, LAYOUT, MODEL, tables=tables, backend="reference"), back)


def test_the_step_multiplier_shows_in_the_error(tables) -> None:
    """Tokens of a finer class come back closer: the classes are not decoration."""
    kv = make_kv(64, 6)
    frame = encode(kv, LAYOUT, MODEL, PCA2T, 100, tables=tables)
    classes = read_classes(memoryview(frame), parse_frame(memoryview(frame)), LAYOUT)
    err = (decode(frame, LAYOUT, MODEL, tables=tables).float() - kv.float()).pow(2).mean(dim=(1, 2, 4)).numpy()
    fine, coarse = err[classes <= 6], err[classes >= 9]
    assert fine.size and coarse.size and fine.mean() < coarse.mean()


def _with_section(frame: bytes, index: int, payload: bytes) -> bytes:
    parsed = parse_frame(frame)
    section = parsed.sections[index]
    data = bytearray(frame[: section.offset] + payload + frame[section.offset + section.size :])
    entry = parsed.sections[0].offset - 4 - 16 * (len(parsed.sections) - index)
    struct.pack_into("<Q", data, entry + 8, len(payload))
    return reseal(data)


def test_hostile_class_sections_are_rejected(tables) -> None:
    frame = encode(make_kv(33, 5), LAYOUT, MODEL, PCA2T, 100, tables=tables)
    section = parse_frame(frame).sections[2]
    with pytest.raises(FormatError) as info:
        decode(_with_section(frame, 2, bytes(section.size - 1)), LAYOUT, MODEL, tables=tables)
    assert info.value.field == "section.size"
    other = bytearray(frame[section.offset : section.offset + section.size])
    other[0] ^= 0x0F  # other classes: other tables and steps, so the streams no longer decode cleanly or differ
    try:
        back = decode(_with_section(frame, 2, bytes(other)), LAYOUT, MODEL, tables=tables)
    except FormatError:
        return
    assert not torch.equal(back, decode(frame, LAYOUT, MODEL, tables=tables))


@pytest.mark.parametrize("level", [6, 7, PCA2T])
def test_tables_carry_the_probe_and_a_ladder(tables, level: int) -> None:
    """Every transform level shares the scale ladder (calibrate.py); only level 8 requires it (FORMAT.md §8)."""
    again = load_tables(tables.to_bytes())
    assert again.id == tables.id and again.transform.probe is not None
    assert np.array_equal(again.transform.probe.queries, tables.transform.probe.queries)
    entry = again.for_level(level)
    assert entry.tables.freq.shape == (token_classes.LADDER_TABLES, 255)
    low, high = token_classes.MAP_RANGE
    assert low <= entry.table_map.min() and entry.table_map.max() <= high


def test_a_ladder_map_out_of_range_is_rejected(tables) -> None:
    entry = tables.for_level(PCA2T)
    forged = type(entry)(PCA2T, entry.bins, np.zeros_like(entry.table_map), entry.tables)  # shift would go below 0
    data = CodecTables(LAYOUT, MODEL, (forged,), tables.transform).to_bytes()
    with pytest.raises(FormatError) as info:
        load_tables(data)
    assert info.value.field == "table_map"


def test_hostile_probe_records_are_rejected(tables) -> None:
    good = tables.to_bytes()
    probe_bytes = tables.transform.probe.to_bytes()
    at = len(good) - 4 - len(probe_bytes)
    nan = bytearray(good)
    struct.pack_into("<f", nan, at + 8, float("nan"))  # first probe query value
    with pytest.raises(FormatError):
        load_tables(reseal_tables(bytes(nan)))
    with pytest.raises(FormatError):
        load_tables(reseal_tables(good[: at + 12] + good[-4:]))  # truncated probe


def reseal_tables(data: bytes) -> bytes:
    from cachegen.codec.bitstream import crc32

    body = data[:-4]
    return body + struct.pack("<I", crc32(body))


def test_encoding_needs_the_probe(tables) -> None:
    t = tables.transform
    bare = Transform(t.mean, t.decode_matrix, t.inv_freq, t.num_sinks, t.steps)
    without = CodecTables(LAYOUT, MODEL, tables.levels, bare)
    with pytest.raises(InvalidRequest):
        encode(make_kv(8, 3), LAYOUT, MODEL, PCA2T, tables=without)
    frame = encode(make_kv(8, 3), LAYOUT, MODEL, PCA2T, tables=tables)
    with pytest.raises(LayoutMismatch):  # other tables id (the probe is in them): a mismatch, not garbage
        decode(frame, LAYOUT, MODEL, tables=without)
