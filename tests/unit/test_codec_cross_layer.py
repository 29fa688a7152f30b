"""The cross-layer level 9 (FORMAT.md §5.7, §8.3): closed-loop bound, gain over no prediction, hostile records."""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest
import torch

from cachegen.codec import calibrate, decode, encode, load_tables
from cachegen.codec.bitstream import crc32
from cachegen.codec.cross_layer_fit import design
from cachegen.codec.transform import CROSS_LAYER_MAGIC, CrossLayer, error_bound, to_vectors
from cachegen.codec.transform_fit import fit_basis
from cachegen.errors import FormatError, InvalidRequest
from cachegen.spec import LEVEL_BY_NAME, KVLayout
from tests.unit.codec_fixtures import layered_kv, tiny_tables

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=16, dtype="bfloat16", tokens_per_chunk=32)
MODEL = b"model-fingerprint"
PCA2X = LEVEL_BY_NAME["pca2x"].id


@pytest.fixture(scope="module")
def tables():
    return tiny_tables(LAYOUT, MODEL)


def _bound(tables) -> np.ndarray:
    return error_bound(tables.transform, PCA2X).reshape(LAYOUT.num_layers, 2, LAYOUT.num_kv_heads, 1, 16)


@pytest.mark.parametrize("token_start", [0, 1000])
def test_every_layer_stays_within_its_own_bound(tables, token_start: int) -> None:
    """Closed loop: the last layer's error is its own coefficients' alone, as the first layer's, not a sum down the
    layers; escaped tokens (sinks, a huge token) come back exactly."""
    kv = layered_kv(LAYOUT, 45, 21)
    kv[:, :, :, 20] *= 300  # no step holds it: raw at every layer
    back = decode(encode(kv, LAYOUT, MODEL, PCA2X, token_start, tables=tables), LAYOUT, MODEL, tables=tables)
    escaped = [20] + ([0, 1, 2, 3] if token_start == 0 else [])
    assert torch.equal(back[:, :, :, escaped], kv[:, :, :, escaped])
    err = (back.float() - kv.float()).abs().numpy()
    # the bound, then the output's bf16 rounding and the f32 slack of the products carried down the layers
    assert np.all(err <= _bound(tables) * (1 + 1e-4) + np.abs(back.float().numpy()) * 2.0**-8 + 1e-4)
    assert err[-1].max() > 0 and err[-1].max() < 2 * err[0].max() + 0.1


def test_prediction_shrinks_frames_of_layers_that_follow_each_other(tables) -> None:
    """At equal steps, the record with its predictor codes layered KV in fewer bytes than the same level with the
    prediction taken out (basis refitted on the plain vectors)."""
    inv_freq = tables.transform.inv_freq
    samples = torch.cat([to_vectors(layered_kv(LAYOUT, 256, seed), inv_freq, 0) for seed in (11, 12)], 2)
    width = LAYOUT.num_kv_heads * LAYOUT.head_dim
    metric = torch.eye(width, dtype=torch.float64).expand(LAYOUT.num_layers, 2, width, width)
    predicted = design(samples, metric, torch.ones(LAYOUT.num_layers, 2), 0.1, 1.0)[0]
    mean, matrix = fit_basis(samples, metric)
    plain = CrossLayer(predicted.steps, mean, matrix, np.zeros_like(predicted.predict_matrix))
    kv = layered_kv(LAYOUT, 64, 22)
    sizes = {}
    for name, record in (("predicted", predicted), ("plain", plain)):
        transform = dataclasses.replace(tables.transform, cross_layer={PCA2X: record})
        own = calibrate([layered_kv(LAYOUT, 64, 23)], LAYOUT, MODEL, transform=transform)
        sizes[name] = len(encode(kv, LAYOUT, MODEL, PCA2X, tables=own))
    assert sizes["predicted"] < 0.9 * sizes["plain"]  # 0.86 measured: layers 1-2 save ~0.7 bits of ~5


def test_tables_without_the_record_have_no_level_9(tables) -> None:
    again = load_tables(tables.to_bytes())
    record = again.transform.cross_layer[PCA2X]
    assert np.array_equal(record.predict_matrix, tables.transform.cross_layer[PCA2X].predict_matrix)
    transform = dataclasses.replace(tables.transform, cross_layer={})
    without = calibrate([layered_kv(LAYOUT, 32, 1)], LAYOUT, MODEL, transform=transform)
    assert without.for_level(PCA2X) is None and load_tables(without.to_bytes()).transform.cross_layer == {}
    with pytest.raises(InvalidRequest):
        encode(layered_kv(LAYOUT, 8, 3), LAYOUT, MODEL, PCA2X, tables=without)


def _edited(data: bytes, offset: int, payload: bytes) -> bytes:
    body = bytearray(data[:-4])
    body[offset : offset + len(payload)] = payload
    return bytes(body) + struct.pack("<I", crc32(bytes(body)))


@pytest.mark.parametrize("edit, field", [
    ("reserved", "cross_layer"), ("depth 0", "cross_layer.depth"), ("depth 9", "cross_layer.depth"),
    ("step", "cross_layer.steps"), ("singular", "cross_layer.decode_matrix"),
    ("nan", "cross_layer.predict_matrix"), ("truncated", "cross_layer.predict_matrix"), ("trailing", "tables_size"),
])  # fmt: skip
def test_hostile_cross_layer_records_name_their_field(tables, edit: str, field: str) -> None:
    """The same edits and fields as kernels/tests/test_golden.cpp's check_bad_cross_layer."""
    data = tables.to_bytes()
    record = data.index(CROSS_LAYER_MAGIC)
    width = LAYOUT.num_kv_heads * LAYOUT.head_dim
    steps_at, per_level = record + 10, LAYOUT.num_layers * 2 * width  # head 8, level 1, depth 1
    matrix_at = steps_at + 8 * per_level
    predict_at = matrix_at + 4 * per_level * width
    if edit == "reserved":
        data = _edited(data, record + 6, b"\1")
    elif edit in ("depth 0", "depth 9"):
        data = _edited(data, record + 9, bytes([int(edit[-1])]))
    elif edit == "step":
        data = _edited(data, steps_at, struct.pack("<f", -1.0))
    elif edit == "singular":  # row 1 = row 0
        data = _edited(data, matrix_at + 4 * width, data[matrix_at : matrix_at + 4 * width])
    elif edit == "nan":
        data = _edited(data, predict_at, struct.pack("<f", float("nan")))
    else:
        body = data[:-8] if edit == "truncated" else data[:-4] + bytes(4)
        data = body + struct.pack("<I", crc32(body))
    with pytest.raises(FormatError) as info:
        load_tables(data)
    assert info.value.field == field
