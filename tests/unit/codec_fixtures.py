"""A model-free transform for the tiny test layout: PCA of the samples in the plain metric, fixed steps, a random
probe; and the stated error bound of a transform-coded frame."""

from __future__ import annotations

import numpy as np
import torch

from cachegen.codec import token_classes
from cachegen.codec.bitstream import parse_frame
from cachegen.codec.cross_layer_fit import design
from cachegen.codec.levels import SCHEME_BY_LEVEL
from cachegen.codec.token_classes import MULTIPLIERS, Probe
from cachegen.codec.transform import Transform, error_bound, to_vectors
from cachegen.codec.transform_fit import NUM_SINKS, fit_basis
from cachegen.codec.transform_frame import read_classes
from cachegen.spec import KVLayout


def tiny_transform(samples: list[torch.Tensor], layout: KVLayout) -> Transform:
    """Steps 0.05, 0.2 and 0.8 for levels 6-8, a closed-loop cross-layer record for level 9; rotary frequencies of
    base 10000."""
    dim = layout.head_dim
    inv_freq = (1.0 / 10000 ** (np.arange(0, dim, 2) / dim)).astype(np.float32)
    vectors = torch.cat([to_vectors(kv, inv_freq, 0) for kv in samples], 2)
    width = layout.num_kv_heads * dim
    metric = torch.eye(width, dtype=torch.float64).expand(layout.num_layers, 2, width, width)
    mean, matrix = fit_basis(vectors, metric)
    levels = sorted(level for level, s in SCHEME_BY_LEVEL.items() if s.is_transform and not s.cross_layer)
    shape = (layout.num_layers, 2, width)
    steps = {level: np.full(shape, 0.05 * 4**i, np.float32) for i, level in enumerate(levels)}
    # cross-layer levels: a closed-loop design at step 0.1 in the plain metric, on KV whose layers follow each other
    # (two 32-token samples are too few for 2W + 1 predictor inputs)
    layered = torch.cat([to_vectors(layered_kv(layout, 256, seed), inv_freq, 0) for seed in (11, 12)], 2)
    unit = torch.ones(layout.num_layers, 2)
    cross = {level: design(layered, metric, unit, 0.1, 1.0)[0]
             for level, s in SCHEME_BY_LEVEL.items() if s.cross_layer}  # fmt: skip
    generator = torch.Generator().manual_seed(7)
    queries = 0.3 * torch.randn(layout.num_layers, layout.num_kv_heads, 4, dim, generator=generator)
    unscaled = Probe(queries.numpy(), np.zeros(queries.shape[:3], np.float32), np.ones(layout.num_layers, np.float32))
    reference = token_classes.scores(vectors[:, 0], unscaled).median(dim=1).values.numpy()
    probe = Probe(unscaled.queries, unscaled.log_norm, reference.astype(np.float32))
    return Transform(mean, matrix, inv_freq, NUM_SINKS, steps, probe, cross)


def frame_bound(tables, frame: bytes, layout: KVLayout) -> np.ndarray:
    """(L, 2, H, T, D) stated bound of a transform-coded frame's values: ``error_bound`` of its level, times
    each token's step multiplier on the token-adaptive level (FORMAT.md §5.6)."""
    parsed = parse_frame(memoryview(frame))
    level, tokens = parsed.header.level, parsed.header.num_tokens
    heads, dim = layout.num_kv_heads, layout.head_dim
    bound = error_bound(tables.transform, level).reshape(layout.num_layers, 2, heads, 1, dim)
    if not SCHEME_BY_LEVEL[level].token_adaptive:
        return np.broadcast_to(bound, (layout.num_layers, 2, heads, tokens, dim))
    multiplier = MULTIPLIERS[read_classes(memoryview(frame), parsed, layout)]  # (L, T)
    return bound * multiplier[:, None, None, :, None]


def outlier_kv(layout: KVLayout, num_tokens: int, seed: int) -> torch.Tensor:
    """Random bf16 KV with one key outlier channel (8x), as real keys have."""
    generator = torch.Generator().manual_seed(seed)
    kv = torch.randn(layout.shape(num_tokens), generator=generator)
    kv[:, 0, :, :, 3] *= 8
    return kv.bfloat16()


def layered_kv(layout: KVLayout, num_tokens: int, seed: int) -> torch.Tensor:
    """``outlier_kv`` whose layer l is mostly layer l - 1 (0.8 of it, plus 0.6 of fresh noise), as a real model's
    residual stream makes them: what the cross-layer level predicts."""
    kv = outlier_kv(layout, num_tokens, seed).float()
    for layer in range(1, layout.num_layers):
        kv[layer] = 0.8 * kv[layer - 1] + 0.6 * kv[layer]
    return kv.bfloat16()


def tiny_tables(layout: KVLayout, model_id: bytes):
    """Tables of every level, transform-coded ones included, calibrated on two ``outlier_kv`` samples of 32 tokens."""
    from cachegen.codec import calibrate

    samples = [outlier_kv(layout, 32, 1), outlier_kv(layout, 32, 2)]
    return calibrate(samples, layout, model_id, transform=tiny_transform(samples, layout))


def assert_within_sum_rounding(a: torch.Tensor, b: torch.Tensor) -> None:
    """Two decodes of one transform-coded frame whose sums of products ran in different orders (FORMAT.md §5.5
    allows any): each value within one 16-bit step of the larger, plus 2^-12 of the frame's largest value for
    cancellation. Exactly equal values are most of them, so a real difference in the arithmetic fails."""
    x, y = a.float(), b.float()
    big = torch.maximum(x.abs(), y.abs())
    bits = 7 if a.dtype == torch.bfloat16 else 10  # stored significand bits
    step = torch.exp2(torch.floor(torch.log2(big.clamp_min(2**-100))) - bits)
    assert bool(((x - y).abs() <= step + float(big.max()) * 2**-12).all())
    assert float((x == y).float().mean()) > 0.9
