"""A model-free transform for the tiny test layout: PCA of the samples in the plain metric, fixed steps."""

from __future__ import annotations

import numpy as np
import torch

from cachegen.codec.levels import SCHEME_BY_LEVEL
from cachegen.codec.transform import Transform, to_vectors
from cachegen.codec.transform_fit import NUM_SINKS, fit_basis
from cachegen.spec import KVLayout


def tiny_transform(samples: list[torch.Tensor], layout: KVLayout) -> Transform:
    """Steps 0.05 and 0.2 for the transform-coded levels, finest first; rotary frequencies of base 10000."""
    dim = layout.head_dim
    inv_freq = (1.0 / 10000 ** (np.arange(0, dim, 2) / dim)).astype(np.float32)
    vectors = torch.cat([to_vectors(kv, inv_freq, 0) for kv in samples], 2)
    width = layout.num_kv_heads * dim
    metric = torch.eye(width, dtype=torch.float64).expand(layout.num_layers, 2, width, width)
    mean, matrix = fit_basis(vectors, metric)
    levels = sorted(level for level, scheme in SCHEME_BY_LEVEL.items() if scheme.is_transform)
    shape = (layout.num_layers, 2, width)
    steps = {level: np.full(shape, 0.05 * 4**i, np.float32) for i, level in enumerate(levels)}
    return Transform(mean, matrix, inv_freq, NUM_SINKS, steps)
