"""The golden frames of tests/golden (FORMAT.md Appendix A): hashes, decodes, re-encodes and rejections."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from cachegen.codec import _ext, decode, encode, load_tables, peek_header
from cachegen.codec.bitstream import parse_frame
from cachegen.codec.transform_frame import read_classes
from cachegen.errors import FormatError, LayoutMismatch
from tests.golden.make_golden import MODEL, SMALL, TINY

GOLDEN = Path(__file__).parents[1] / "golden"
MANIFEST = [line.split() for line in (GOLDEN / "MANIFEST").read_text().splitlines() if line.strip()]
BACKENDS = ["reference"] + (["cpu"] if _ext.has_cpu() else [])


def read(name: str) -> bytes:
    return (GOLDEN / name).read_bytes()


@pytest.mark.parametrize(("name", "sha256"), [(n, h) for n, h, _ in MANIFEST])
def test_golden_file_hashes(name: str, sha256: str) -> None:
    assert hashlib.sha256(read(name)).hexdigest() == sha256


def small_kv() -> torch.Tensor:
    return (
        torch.from_numpy(np.frombuffer(read("small_kv.bin"), np.int16).copy())
        .view(torch.bfloat16)
        .reshape(SMALL.shape(40))
    )


def test_raw_tiny_frame_decodes_to_appendix_values() -> None:
    kv = decode(read("raw_tiny.bin"), TINY, MODEL)
    assert kv.flatten().tolist() == [1.0, -2.0, 0.5, 0.0, 3.0, 0.25, -1.0, 8.0] * 2
    assert peek_header(read("raw_tiny.bin")).token_start == 256


@pytest.mark.parametrize("backend", BACKENDS)
def test_coded_frames_decode_and_reencode_identically(backend: str) -> None:
    tables = load_tables(read("tables_small.cgct"))
    kv = small_kv()
    lossless = decode(read("lossless_small.bin"), SMALL, MODEL, tables=tables, backend=backend)
    assert torch.equal(lossless.view(torch.int16), kv.view(torch.int16))
    q32 = decode(read("q32_small.bin"), SMALL, MODEL, tables=tables, backend=backend)
    assert q32.view(torch.int16).numpy().tobytes() == read("q32_small_decoded.bin")
    assert encode(kv, SMALL, MODEL, 1, tables=tables, backend=backend) == read("lossless_small.bin")
    assert encode(kv, SMALL, MODEL, 3, tables=tables, backend=backend) == read("q32_small.bin")


@pytest.mark.parametrize(("name", "field"), [(n, e) for n, _, e in MANIFEST if n.startswith("bad_")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_frames_report_their_field(name: str, field: str, backend: str) -> None:
    tables = load_tables(read("tables_small.cgct"))
    layout = SMALL if len(read(name)) > 1000 else TINY
    with pytest.raises(FormatError) as info:
        decode(read(name), layout, MODEL, tables=tables, backend=backend)
    assert info.value.field == field


def test_wrong_model_frame_is_layout_mismatch() -> None:
    with pytest.raises(LayoutMismatch):
        decode(read("wrong_model.bin"), SMALL, MODEL)


TRANSFORM_GOLDEN = [  # tables, frame, its reference decode, a bad frame of the same level, the field it must get
    ("tables_small_pca.cgct", "pca2_small.bin", "pca2_small_decoded.bin", "transform_bad_escapes.bin", "escapes"),
    ("tables_small_pca2t.cgct", "pca2t_small.bin", "pca2t_small_decoded.bin", "transform_bad_classes_size.bin",
     "section.size"),
]  # fmt: skip


@pytest.mark.parametrize(("tables_name", "name", "decoded", "bad", "field"), TRANSFORM_GOLDEN)
@pytest.mark.parametrize("backend", BACKENDS)
def test_transform_frame_decodes_within_rounding_of_golden(
    tables_name: str, name: str, decoded: str, bad: str, field: str, backend: str
) -> None:
    """Levels 7 and 8 (FORMAT.md §5.5, §5.6) decode exactly to f32 rounding: within one bf16 step of the golden
    output, the escaped sink tokens 0-3 bit for bit; the bad frame (an ESCAPES count of 41 for 40 tokens, a
    TOKEN_CLASSES section one byte too long) is rejected by name."""
    tables = load_tables(read(tables_name))
    got = decode(read(name), SMALL, MODEL, tables=tables, backend=backend).float()
    want = torch.from_numpy(np.frombuffer(read(decoded), np.int16).copy()).view(torch.bfloat16)
    want = want.reshape(SMALL.shape(40)).float()
    assert torch.all((got - want).abs() <= want.abs() * 2.0**-7 + 1e-6)
    assert torch.equal(got[:, :, :, :4], small_kv()[:, :, :, :4].float())
    with pytest.raises(FormatError) as info:
        decode(read(bad), SMALL, MODEL, tables=tables, backend=backend)
    assert info.value.field == field


def test_token_adaptive_golden_frame_uses_several_classes() -> None:
    """The level-8 golden frame exercises what §5.6 adds: its tables carry a probe record (§8.2) and its tokens
    several classes, so both the table shifts and the step multipliers vary."""
    tables = load_tables(read("tables_small_pca2t.cgct"))
    assert tables.transform is not None and tables.transform.probe is not None
    frame = memoryview(read("pca2t_small.bin"))
    assert len(np.unique(read_classes(frame, parse_frame(frame), SMALL))) >= 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_layer_golden_frame_decodes_within_rounding(backend: str) -> None:
    """Level 9 (FORMAT.md §5.7) decodes to f32 rounding carried down the layers: within one bf16 step of the golden
    output, the escaped sinks bit for bit. Its tables' record predicts strongly (designed on KV whose layers follow
    each other), so a decoder that dropped the prediction would miss by far more than the tolerance."""
    import dataclasses

    tables = load_tables(read("tables_small_pca2x.cgct"))
    got = decode(read("pca2x_small.bin"), SMALL, MODEL, tables=tables, backend=backend).float()
    want = torch.from_numpy(np.frombuffer(read("pca2x_small_decoded.bin"), np.int16).copy()).view(torch.bfloat16)
    want = want.reshape(SMALL.shape(40)).float()
    assert torch.all((got - want).abs() <= want.abs() * 2.0**-7 + 1e-6)
    assert torch.equal(got[:, :, :, :4], small_kv()[:, :, :, :4].float())
    record = tables.transform.cross_layer[9]
    blind = dataclasses.replace(record, predict_matrix=np.zeros_like(record.predict_matrix))
    tables.transform.cross_layer[9] = blind  # same tables id: only the prediction differs
    dropped = decode(read("pca2x_small.bin"), SMALL, MODEL, tables=tables, backend=backend).float()
    assert float((dropped - want)[1:, :, :, 4:].abs().mean()) > 0.5  # 0.77 measured; layer 1 averages |0.90|
    assert float((dropped - want)[0, 1, :, 4:].abs().mean()) > 0.08  # 0.16: layer 0's values read its keys
