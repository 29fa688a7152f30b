"""Transform-coded levels 6-7 (FORMAT.md §5.5, §8.1): bound, escapes, rotary convention, hostile input."""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest
import torch

from cachegen.codec import calibrate, decode, encode, load_tables
from cachegen.codec.bitstream import parse_frame
from cachegen.codec.transform import TRANSFORM_MAGIC, error_bound, from_vectors, rotary, to_vectors
from cachegen.codec.transform_fit import fit_steps
from cachegen.errors import FormatError, InvalidRequest
from cachegen.spec import LEVEL_BY_NAME, KVLayout
from tests.golden.make_golden import reseal
from tests.unit.codec_fixtures import outlier_kv, tiny_tables

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16", tokens_per_chunk=32)
MODEL = b"model-fingerprint"
PCA3, PCA2 = LEVEL_BY_NAME["pca3"].id, LEVEL_BY_NAME["pca2"].id


def make_kv(num_tokens: int, seed: int) -> torch.Tensor:
    return outlier_kv(LAYOUT, num_tokens, seed)


@pytest.fixture(scope="module")
def tables():
    return tiny_tables(LAYOUT, MODEL)


@pytest.mark.parametrize("level", [PCA3, PCA2])
@pytest.mark.parametrize("token_start", [0, 1000])
def test_error_within_stated_bound_and_escapes_exact(tables, level: int, token_start: int) -> None:
    kv = make_kv(45, 4)
    kv[:, :, :, 20] *= 200  # a token no step can hold: it must travel raw
    back = decode(encode(kv, LAYOUT, MODEL, level, token_start, tables=tables), LAYOUT, MODEL, tables=tables)
    escaped = [20] + ([0, 1, 2, 3] if token_start == 0 else [])
    assert torch.equal(back[:, :, :, escaped], kv[:, :, :, escaped])
    bound = error_bound(tables.transform, level).reshape(2, 2, 2, 1, 16)  # (l, kv, h, 1, d)
    err = (back.float() - kv.float()).abs().numpy()
    # the bound, then the output's bf16 rounding (half an ulp) and f32 slack of the matrix product
    assert np.all(err <= bound * (1 + 1e-4) + np.abs(back.float().numpy()) * 2.0**-8 + 1e-5)
    assert err.max() > 0  # lossy: the bound is not vacuous


def test_rotary_matches_the_llama_convention() -> None:
    """Keys lose exactly the rotation HF's Llama gives them (pairs (i, i + D/2)), and get it back."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inv_freq = (1.0 / 10000 ** (np.arange(0, 16, 2) / 16)).astype(np.float32)
    pre = torch.randn(2, 2, 2, 7, 16)
    cos, sin = rotary(inv_freq, 50, 7)
    cos2, sin2 = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    post_keys, _ = apply_rotary_pos_emb(pre[:, 0], pre[:, 0], cos2, sin2, unsqueeze_dim=0)
    post = torch.stack([post_keys, pre[:, 1]], 1)
    vectors = to_vectors(post, inv_freq, 50)
    assert torch.allclose(vectors, pre.permute(0, 1, 3, 2, 4).reshape(2, 2, 7, 32), atol=1e-5)
    assert torch.allclose(from_vectors(vectors, LAYOUT, inv_freq, 50), post, atol=1e-5)


def test_tables_carry_the_transform(tables) -> None:
    data = tables.to_bytes()
    again = load_tables(data)
    assert again.id == tables.id and again.transform is not None
    assert np.array_equal(again.transform.decode_matrix, tables.transform.decode_matrix)
    without = calibrate([make_kv(32, 1)], LAYOUT, MODEL)  # no model, no transform: no levels 6-7
    assert without.for_level(PCA3) is None and load_tables(without.to_bytes()).transform is None
    with pytest.raises(InvalidRequest):
        encode(make_kv(8, 3), LAYOUT, MODEL, PCA3, tables=without)


def _resealed_tables(data: bytes) -> bytes:
    from cachegen.codec.bitstream import crc32

    body = data[:-4]
    return body + struct.pack("<I", crc32(body))


def test_hostile_transform_records_are_rejected(tables) -> None:
    good = tables.to_bytes()
    record = dataclasses.replace(tables.transform, probe=None, cross_layer={}).to_bytes()  # CGTX alone
    at = good.index(TRANSFORM_MAGIC)
    end = at + len(record)
    with pytest.raises(FormatError):
        load_tables(_resealed_tables(good[: at + 20] + good[-4:]))  # truncated record
    matrix_bytes = tables.transform.decode_matrix.size * 4  # the record ends with the decode matrices
    singular = np.ones(matrix_bytes // 4, "<f4").tobytes()
    with pytest.raises(FormatError):
        load_tables(_resealed_tables(good[: end - matrix_bytes] + singular + good[end:]))
    nan_step = bytearray(good)
    struct.pack_into("<f", nan_step, at + 13, float("nan"))  # first step of the first level
    with pytest.raises(FormatError):
        load_tables(_resealed_tables(bytes(nan_step)))


def test_transform_level_entries_must_have_their_shape(tables) -> None:
    """A level 6-7 entry with another alphabet would decode to garbage coefficients: rejected at load instead."""
    from cachegen.codec.tables import CodecTables

    entry = calibrate([make_kv(32, 1)], LAYOUT, MODEL).for_level(LEVEL_BY_NAME["q32"].id)
    forged = type(entry)(PCA2, entry.bins, entry.table_map, entry.tables)  # q32's 31-symbol tables as level 7
    data = CodecTables(LAYOUT, MODEL, (forged,), tables.transform).to_bytes()
    with pytest.raises(FormatError) as info:
        load_tables(data)
    assert info.value.field == "level_shape"


def _with_escapes(frame: bytes, payload: bytes) -> bytes:
    """The frame with its ESCAPES section replaced (section table and both CRCs redone)."""
    parsed = parse_frame(frame)
    section = parsed.sections[1]
    data = bytearray(frame[: section.offset] + payload + frame[section.offset + section.size :])
    entry = parsed.sections[0].offset - 4 - 16 * (len(parsed.sections) - 1)  # section table entry 1
    struct.pack_into("<Q", data, entry + 8, len(payload))
    return reseal(data)


@pytest.mark.parametrize(
    "count, indices",
    [(9, [1]), (2, [3, 3]), (2, [5, 2]), (1, [40]), (100, [])],
)
def test_hostile_escapes_are_rejected(tables, count: int, indices: list[int]) -> None:
    frame = encode(make_kv(40, 5), LAYOUT, MODEL, PCA2, 100, tables=tables)
    per_token = LAYOUT.values_per_token * 2
    payload = struct.pack("<I", count) + struct.pack(f"<{len(indices)}H", *indices)
    payload += bytes(per_token * len(indices))
    with pytest.raises(FormatError) as info:
        decode(_with_escapes(frame, payload), LAYOUT, MODEL, tables=tables)
    assert info.value.field == "escapes"


def test_fit_steps_hits_the_target_rate() -> None:
    """Bisected steps code Laplacian coefficients at the asked bits/value, finer groups where it is sensitive."""
    torch.manual_seed(0)
    coefs = torch.distributions.Laplace(0.0, 1.0).sample((2, 2, 4000, 32)) * torch.linspace(0.1, 3, 32)
    sensitivity = np.array([[4.0, 1.0], [1.0, 0.25]])
    steps = fit_steps(coefs, sensitivity, 2.0)
    assert steps.shape == (2, 2, 32) and steps[0, 0, 0] < steps[0, 1, 0] < steps[1, 1, 0]
    assert np.all(coefs.abs().amax(dim=2).numpy() / steps < 127)  # no calibration token would travel raw
    q = torch.round(coefs / torch.from_numpy(steps)[:, :, None])
    bits = 0.0
    for row in q.permute(0, 1, 3, 2).reshape(-1, 4000):
        _, counts = torch.unique(row, return_counts=True)
        p = counts.double() / 4000
        bits -= float((p * p.log2()).sum()) * 4000
    assert abs(bits / coefs.numel() - 2.0) < 0.02


def test_finer_level_steps_never_exceed_the_coarser_ones() -> None:
    """A finer level with a wider range margin still gets no coarser step than the level below it (the cap)."""
    torch.manual_seed(1)
    coefs = torch.distributions.Laplace(0.0, 1.0).sample((1, 2, 3000, 16))
    coefs[:, :, :3, 0] = 1000.0  # a heavy-tailed coefficient: its range floor binds, higher for the wider margin
    sensitivity = np.ones((1, 2))
    coarse = fit_steps(coefs, sensitivity, 1.0, margin=0.8)
    fine = fit_steps(coefs, sensitivity, 2.5, margin=1.5, cap=coarse)
    uncapped = fit_steps(coefs, sensitivity, 2.5, margin=1.5)
    assert np.all(fine <= coarse) and np.any(uncapped > coarse)  # the cap binds on the widest coefficients
