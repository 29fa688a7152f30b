"""The extension's inverse transform of levels 6-8 (kernels/cpu/transform_cpu.cpp): FORMAT.md §5.5 steps 1-3
computed in float64, torch's ``transform.dequantize``, threads, and the checks on its buffers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cachegen.codec import _ext, transform
from cachegen.codec.token_classes import MULTIPLIERS
from cachegen.codec.transform import Transform
from cachegen.spec import KVLayout
from tests.unit.codec_fixtures import assert_within_sum_rounding

pytestmark = pytest.mark.skipif(not _ext.has_inverse_transform(), reason="C++ extension not built (pip install -e .)")
DTYPES = {"bfloat16": (torch.bfloat16, 7), "float16": (torch.float16, 10)}  # stored significand bits
# W = heads * head_dim: 192 and 256 take register accumulators (SmolLM2 is 3 x 64), 40 the any-width loop.
SHAPES = [(3, 64), (2, 128), (2, 20)]


def random_transform(heads: int, dim: int, layers: int, seed: int) -> Transform:
    """An orthogonal basis scaled per coefficient, a mean, steps 0.05-0.3 and rotary frequencies of base 10000."""
    rng = np.random.default_rng(seed)
    width = heads * dim
    basis = np.linalg.qr(rng.standard_normal((layers * 2, width, width)))[0]
    matrix = (basis * rng.uniform(0.2, 2.0, (layers * 2, width, 1))).reshape(layers, 2, width, width)
    mean = rng.standard_normal((layers, 2, width)) * 0.5
    inv_freq = 1.0 / 10000 ** (np.arange(0, dim, 2) / dim)
    steps = {level: rng.uniform(0.05, 0.3, (layers, 2, width)).astype(np.float32) for level in (6, 7, 8)}
    return Transform(mean.astype(np.float32), matrix.astype(np.float32), inv_freq.astype(np.float32), 4, steps)


def random_symbols(layers: int, heads: int, tokens: int, dim: int, seed: int) -> np.ndarray:
    """Symbols within 127 +- 40, about half of them 127 (a zero coefficient), as on a coarse level."""
    rng = np.random.default_rng(seed)
    symbols = rng.integers(127 - 40, 127 + 41, (layers, 2, heads, tokens, dim))
    return np.where(rng.random(symbols.shape) < 0.5, 127, symbols).astype(np.int32)


def exact(symbols: np.ndarray, tx: Transform, level: int, token_start: int, classes: np.ndarray | None):
    """§5.5 in float64 after step 1's f32 products: values (L, 2, H, T, D) and the magnitude each one's f32 sum
    of products is made of (its error scale)."""
    layers, _, heads, tokens, dim = symbols.shape
    width, half = heads * dim, dim // 2
    q = (symbols.astype(np.float32) - 127).transpose(0, 1, 3, 2, 4).reshape(layers, 2, tokens, width)
    y = q * tx.steps[level][:, :, None]
    if classes is not None:
        y = y * MULTIPLIERS[classes][:, None, :, None]
    matrix, mean = tx.decode_matrix.astype(np.float64), tx.mean.astype(np.float64)[:, :, None]
    x = y.astype(np.float64) @ matrix + mean
    scale = np.abs(y.astype(np.float64)) @ np.abs(matrix) + np.abs(mean)

    def heads_first(a: np.ndarray) -> np.ndarray:
        return a.reshape(layers, 2, tokens, heads, dim).transpose(0, 1, 3, 2, 4).copy()

    x, scale = heads_first(x), heads_first(scale)
    angle = np.arange(token_start, token_start + tokens, dtype=np.float64)[:, None] * tx.inv_freq.astype(np.float64)
    cos, sin = np.cos(angle).astype(np.float32).astype(np.float64), np.sin(angle).astype(np.float32).astype(np.float64)
    u, v = x[:, 0, :, :, :half].copy(), x[:, 0, :, :, half:].copy()
    x[:, 0, :, :, :half], x[:, 0, :, :, half:] = u * cos - v * sin, v * cos + u * sin
    pair = scale[:, 0, :, :, :half] + scale[:, 0, :, :, half:]
    scale[:, 0] = np.concatenate([pair, pair], -1)
    return x, scale


def inverse(symbols, tx, level, token_start, classes, dtype: str, threads: int = 1) -> torch.Tensor:
    bits = _ext.inverse_transform(symbols, tx, level, token_start, classes, dtype == "bfloat16", threads)
    return torch.from_numpy(bits).view(DTYPES[dtype][0])


@pytest.mark.parametrize("heads,dim", SHAPES)
@pytest.mark.parametrize("level", [6, 8])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("token_start", [0, 70_000])
def test_matches_the_format_in_float64(heads: int, dim: int, level: int, dtype: str, token_start: int) -> None:
    layers, tokens = 2, 37
    tx = random_transform(heads, dim, layers, seed=heads * dim)
    symbols = random_symbols(layers, heads, tokens, dim, seed=level)
    classes = np.random.default_rng(1).integers(0, 16, (layers, tokens)) if level == 8 else None
    got = inverse(symbols, tx, level, token_start, classes, dtype).float().numpy().astype(np.float64)
    want, scale = exact(symbols, tx, level, token_start, classes)
    # f32 sums of W + 1 terms, a rotation, then one rounding to 16 bits
    step = np.exp2(np.floor(np.log2(np.maximum(np.abs(want), 2.0**-100))) - DTYPES[dtype][1])
    allowed = step + 2 * (heads * dim + 4) * 2.0**-24 * scale
    assert np.all(np.abs(got - want) <= allowed)


@pytest.mark.parametrize("heads,dim", SHAPES)
@pytest.mark.parametrize("level", [7, 8])
def test_matches_torch_dequantize(heads: int, dim: int, level: int) -> None:
    layers, tokens, start = 3, 50, 1234
    tx = random_transform(heads, dim, layers, seed=5)
    symbols = random_symbols(layers, heads, tokens, dim, seed=11)
    classes = np.random.default_rng(2).integers(0, 16, (layers, tokens)) if level == 8 else None
    layout = KVLayout(num_layers=layers, num_kv_heads=heads, head_dim=dim, dtype="bfloat16", tokens_per_chunk=64)
    want = transform.dequantize(symbols, tx, level, layout, start, classes).to(torch.bfloat16)
    assert_within_sum_rounding(inverse(symbols, tx, level, start, classes, "bfloat16"), want)


def test_threads_give_the_same_bits() -> None:
    tx = random_transform(3, 64, 4, seed=3)
    symbols = random_symbols(4, 3, 40, 64, seed=4)
    one = inverse(symbols, tx, 7, 9, None, "bfloat16", threads=1)
    assert torch.equal(one.view(torch.int16), inverse(symbols, tx, 7, 9, None, "bfloat16", threads=3).view(torch.int16))


def test_rejects_buffers_that_do_not_fit() -> None:
    tx = random_transform(2, 20, 2, seed=6)
    symbols = random_symbols(2, 2, 8, 20, seed=7)
    with pytest.raises(ValueError, match="class out of range"):
        inverse(symbols, tx, 8, 0, np.full((2, 8), 16), "bfloat16")
    with pytest.raises(ValueError, match="classes size"):
        inverse(symbols, tx, 8, 0, np.zeros((2, 7), np.int64), "bfloat16")
    short = Transform(tx.mean[:1], tx.decode_matrix[:1], tx.inv_freq, 4, {7: tx.steps[7][:1]})
    with pytest.raises(ValueError, match="size"):
        inverse(symbols, short, 7, 0, None, "bfloat16")


def test_dequantize_takes_symbols_as_a_tensor() -> None:
    """What a GPU decode passes (uint8 symbols as a tensor, FORMAT.md §5.5's arithmetic on the device): on the CPU
    it must give the numpy path's values bit for bit."""
    layers, heads, dim, tokens = 2, 3, 64, 20
    tx = random_transform(heads, dim, layers, seed=8)
    symbols = random_symbols(layers, heads, tokens, dim, seed=9)
    layout = KVLayout(num_layers=layers, num_kv_heads=heads, head_dim=dim, dtype="bfloat16", tokens_per_chunk=32)
    want = transform.dequantize(symbols, tx, 7, layout, 5)
    got = transform.dequantize(torch.from_numpy(symbols.astype(np.uint8)), tx, 7, layout, 5, device="cpu")
    assert torch.equal(got, want)
