"""The C++ extension and the numpy reference path: identical bytes out, identical values back (STYLE §6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cachegen import spec
from cachegen.codec import _ext, calibrate, decode, encode
from cachegen.codec.bitstream import HEADER_SIZE
from cachegen.codec.levels import SCHEME_BY_LEVEL
from cachegen.codec.quant import STREAM_TOKENS
from cachegen.codec.rans import PRECISION
from cachegen.errors import FormatError
from cachegen.spec import KVLayout
from tests.golden.make_golden import reseal

pytestmark = pytest.mark.skipif(not _ext.has_cpu(), reason="C++ extension not built (pip install -e .)")
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16", tokens_per_chunk=32)
MODEL = b"model-fingerprint"


def make_kv(num_tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(LAYOUT.shape(num_tokens), generator=generator) * 2).bfloat16()


@pytest.fixture(scope="module")
def tables():
    return calibrate([make_kv(32, 1), make_kv(32, 2)], LAYOUT, MODEL)


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
