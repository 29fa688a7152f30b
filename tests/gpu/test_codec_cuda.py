"""CUDA decode vs CPU bytes (STYLE §7 tests/gpu): run by `make gpu-check` / `pytest -m gpu` on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from cachegen.codec import _ext, calibrate, decode, encode
from cachegen.codec.bitstream import pack_frame, parse_frame
from cachegen.errors import FormatError
from cachegen.spec import KVLayout

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _ext.has_cuda(), reason="needs a CUDA device (and `make gpu-check` to build the library)"),
]
# head_dim 64 takes the register path of the kernel (like SmolLM2), 128 its wide variant, 32 the generic path.
LAYOUTS = {dim: KVLayout(num_layers=4, num_kv_heads=3, head_dim=dim, dtype="bfloat16") for dim in (64, 128, 32)}
MODEL = b"gpu-test"


def make_kv(layout: KVLayout, num_tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(layout.shape(num_tokens), generator=generator).bfloat16()


@pytest.fixture(scope="module")
def tables():
    return {dim: calibrate([make_kv(layout, 256, 1)], layout, MODEL) for dim, layout in LAYOUTS.items()}


@pytest.mark.parametrize("dim", [64, 128, 32])
@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("num_tokens", [256, 45])
def test_cuda_decode_matches_cpu_bytes(tables, dim: int, level: int, num_tokens: int) -> None:
    layout = LAYOUTS[dim]
    frame = encode(make_kv(layout, num_tokens, 2), layout, MODEL, level, tables=tables[dim])
    cpu = decode(frame, layout, MODEL, tables=tables[dim])
    gpu = torch.empty(layout.shape(num_tokens), dtype=torch.bfloat16, device="cuda")
    decode(frame, layout, MODEL, out=gpu, tables=tables[dim])
    assert torch.equal(gpu.cpu().view(torch.int16), cpu.view(torch.int16))


def _flip_last_word(frame: bytes) -> bytes:
    """The frame with one bit of the last stream's initial state flipped and its CRCs made valid again."""
    view = memoryview(frame).cast("B")
    parsed = parse_frame(view)
    sections = [(s.kind, bytearray(view[s.offset : s.offset + s.size])) for s in parsed.sections]
    sections[-1][1][-1] ^= 0x40
    return pack_frame(parsed.header, [(kind, bytes(payload)) for kind, payload in sections])


@pytest.mark.parametrize("level", [1, 4])
def test_cuda_decode_rejects_corrupt_words(tables, level: int) -> None:
    """A flipped bit in the last stream's initial state, behind a valid CRC: the kernel's final-state check fires."""
    layout = LAYOUTS[64]
    frame = encode(make_kv(layout, 64, 3), layout, MODEL, level, tables=tables[64])
    frame = _flip_last_word(frame)
    gpu = torch.empty(layout.shape(64), dtype=torch.bfloat16, device="cuda")
    with pytest.raises(FormatError):
        decode(frame, layout, MODEL, out=gpu, tables=tables[64])


@pytest.fixture(scope="module")
def transform_tables():
    """Tables with the transform-coded levels for the 64-dim layout (3 heads x 64 = 192, as SmolLM2)."""
    from tests.unit.codec_fixtures import tiny_transform

    layout = LAYOUTS[64]
    samples = [make_kv(layout, 256, 4), make_kv(layout, 256, 5)]
    return calibrate(samples, layout, MODEL, transform=tiny_transform(samples, layout))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("level", [6, 7, 8, 9])
@pytest.mark.parametrize("token_start", [0, 300])
def test_transform_levels_decode_on_the_gpu(transform_tables, level: int, token_start: int) -> None:
    """Levels 6-9 into a CUDA tensor: streams and the inverse transform (float64 products; level 9's chain down the
    layers in float64) on the GPU, equal to the CPU decode within f32 rounding; escaped tokens (sinks at 0) exact."""
    from tests.unit.codec_fixtures import assert_within_sum_rounding

    layout = LAYOUTS[64]
    kv = make_kv(layout, 45, 6)
    frame = encode(kv, layout, MODEL, level, token_start, tables=transform_tables)
    cpu = decode(frame, layout, MODEL, tables=transform_tables)
    gpu = torch.empty(layout.shape(45), dtype=torch.bfloat16, device="cuda")
    decode(frame, layout, MODEL, out=gpu, tables=transform_tables)
    assert_within_sum_rounding(gpu.cpu(), cpu)
    if token_start == 0:
        assert torch.equal(gpu.cpu()[:, :, :, :4], kv[:, :, :, :4])


@pytest.mark.skipif(not _ext.has_cuda_symbols(), reason="needs a CUDA device and a build with the symbol kernel")
@pytest.mark.parametrize("level", [6, 7, 8, 9])
@pytest.mark.parametrize("num_tokens", [256, 45])
def test_cuda_symbols_match_the_cpu_extension(transform_tables, level: int, num_tokens: int) -> None:
    """The CUDA kernel's symbols of levels 6-9 (level 8 with its per-token table shifts) equal the CPU's exactly."""
    from cachegen.codec.calibrate import level_symbols

    entry = transform_tables.for_level(level)
    symbols, shift = level_symbols(make_kv(LAYOUTS[64], num_tokens, 7), level, None, transform_tables.transform)
    sizes, words = _ext.encode_symbols(symbols, entry, token_shift=shift)
    gpu, status = _ext.decode_symbols_cuda(words, sizes, entry, symbols.shape, shift, torch.device("cuda"))
    assert not status.any()
    assert torch.equal(gpu.cpu().to(torch.int32), torch.from_numpy(symbols.astype("int32")))


@pytest.mark.skipif(not _ext.has_cuda_symbols(), reason="needs a CUDA device and a build with the symbol kernel")
def test_cuda_symbols_reject_corrupt_words(transform_tables) -> None:
    """Level 8 with a flipped bit in the last stream's initial state, behind a valid CRC: a FormatError."""
    layout = LAYOUTS[64]
    frame = encode(make_kv(layout, 64, 8), layout, MODEL, 8, tables=transform_tables)
    frame = _flip_last_word(frame)
    gpu = torch.empty(layout.shape(64), dtype=torch.bfloat16, device="cuda")
    with pytest.raises(FormatError):
        decode(frame, layout, MODEL, out=gpu, tables=transform_tables)
