"""CUDA decode vs CPU bytes (STYLE §7 tests/gpu): run by `make gpu-check` / `pytest -m gpu` on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from cachegen.codec import _ext, calibrate, decode, encode
from cachegen.spec import KVLayout

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _ext.has_cuda(), reason="needs a CUDA device (and `make gpu-check` to build the library)"),
]
LAYOUT = KVLayout(num_layers=4, num_kv_heads=3, head_dim=64, dtype="bfloat16", tokens_per_chunk=256)
MODEL = b"gpu-test"


def make_kv(num_tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(LAYOUT.shape(num_tokens), generator=generator).bfloat16()


@pytest.fixture(scope="module")
def tables():
    return calibrate([make_kv(256, 1)], LAYOUT, MODEL)


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("num_tokens", [256, 45])
def test_cuda_decode_matches_cpu_bytes(tables, level: int, num_tokens: int) -> None:
    frame = encode(make_kv(num_tokens, 2), LAYOUT, MODEL, level, tables=tables)
    cpu = decode(frame, LAYOUT, MODEL, tables=tables)
    gpu = torch.empty(LAYOUT.shape(num_tokens), dtype=torch.bfloat16, device="cuda")
    decode(frame, LAYOUT, MODEL, out=gpu, tables=tables)
    assert torch.equal(gpu.cpu().view(torch.int16), cpu.view(torch.int16))
