"""Level 0 ("raw") round trips and the container's rejection of corrupt, truncated and foreign frames."""

from __future__ import annotations

import pytest
import torch

from cachegen.codec import decode, encode, peek_header
from cachegen.errors import FormatError, InvalidRequest, LayoutMismatch, UnsupportedVersion
from cachegen.spec import KVLayout

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16", tokens_per_chunk=32)
MODEL = b"model-fingerprint"


def make_kv(num_tokens: int = 32, seed: int = 0, layout: KVLayout = LAYOUT) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(layout.shape(num_tokens), generator=generator).to(getattr(torch, layout.dtype))


def test_raw_roundtrip_is_bit_identical() -> None:
    kv = make_kv()
    frame = encode(kv, LAYOUT, MODEL, level=0, token_start=64)
    back = decode(frame, LAYOUT, MODEL)
    assert back.dtype == torch.bfloat16 and back.shape == kv.shape
    assert torch.equal(back.view(torch.int16), kv.view(torch.int16))
    header = peek_header(frame)
    assert (header.level, header.token_start, header.num_tokens, header.model_id) == (0, 64, 32, MODEL)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_raw_roundtrip_other_dtypes(dtype: str) -> None:
    layout = KVLayout(2, 2, 16, dtype, 32)
    kv = make_kv(7, layout=layout)
    assert torch.equal(decode(encode(kv, layout, MODEL), layout, MODEL), kv)


def test_decode_into_preallocated_and_strided_input() -> None:
    kv = make_kv()
    strided = kv.transpose(3, 4).contiguous().transpose(3, 4)  # same values, non-contiguous
    out = torch.zeros_like(kv)
    result = decode(encode(strided, LAYOUT, MODEL), LAYOUT, MODEL, out=out)
    assert result is out and torch.equal(out, kv)


def test_raw_frame_size_is_payload_plus_small_header() -> None:
    kv = make_kv()
    assert len(encode(kv, LAYOUT, MODEL)) - kv.numel() * 2 < 128


def test_every_truncation_is_a_format_error() -> None:
    frame = encode(make_kv(4), LAYOUT, MODEL)
    for cut in range(len(frame)):
        with pytest.raises(FormatError):
            decode(frame[:cut], LAYOUT, MODEL)
    with pytest.raises(FormatError):
        decode(frame + b"\0", LAYOUT, MODEL)


def test_every_single_bit_flip_is_detected() -> None:
    frame = bytearray(encode(make_kv(2), LAYOUT, MODEL))
    for bit in range(len(frame) * 8):
        frame[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises((FormatError, LayoutMismatch)):
            decode(bytes(frame), LAYOUT, MODEL)
        frame[bit // 8] ^= 1 << (bit % 8)


def test_wrong_model_or_layout_is_layout_mismatch() -> None:
    frame = encode(make_kv(), LAYOUT, MODEL)
    with pytest.raises(LayoutMismatch):
        decode(frame, LAYOUT, b"another-model")
    with pytest.raises(LayoutMismatch):
        decode(frame, KVLayout(2, 2, 16, "bfloat16", 64), MODEL)
    with pytest.raises(LayoutMismatch):
        decode(frame, LAYOUT, MODEL, out=torch.empty(LAYOUT.shape(31), dtype=torch.bfloat16))


def test_other_version_is_unsupported() -> None:
    frame = bytearray(encode(make_kv(), LAYOUT, MODEL))
    frame[4] = 9
    with pytest.raises(UnsupportedVersion) as info:
        decode(bytes(frame), LAYOUT, MODEL)
    assert (info.value.field, info.value.offset, info.value.got) == ("version", 4, 9)


def test_encode_rejects_bad_input() -> None:
    with pytest.raises(LayoutMismatch):
        encode(make_kv().float(), LAYOUT, MODEL)
    with pytest.raises(LayoutMismatch):
        encode(make_kv()[:1], LAYOUT, MODEL)
    with pytest.raises(InvalidRequest):
        encode(make_kv(), LAYOUT, MODEL, level=250)
    with pytest.raises(InvalidRequest):
        encode(make_kv(), LAYOUT, b"")


def test_hostile_token_count_with_valid_crc_is_rejected_before_allocating() -> None:
    import struct
    import zlib

    frame = bytearray(encode(make_kv(2), LAYOUT, MODEL))
    struct.pack_into("<I", frame, 24, 1 << 16)  # claims 65536 tokens in a frame that holds 2
    head_size = 48 + len(MODEL) + 16
    struct.pack_into("<I", frame, head_size, zlib.crc32(bytes(frame[:head_size])))
    with pytest.raises(FormatError) as info:
        decode(bytes(frame), LAYOUT, MODEL)
    assert info.value.field == "section.size"
