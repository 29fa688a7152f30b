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

import numpy as np
import torch

from cachegen.codec.cross_layer import code_vectors, features
from cachegen.codec.transform import MAX_COEFFICIENT, CrossLayer
from cachegen.codec.transform_fit import ALPHA, _entropy_bits, fit_basis

log = logging.getLogger(__name__)

RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
"""Predictor least squares: the share of each feature's energy added to the normal equations' diagonal, chosen per
layer by two-fold validation on the calibration vectors' halves. With 6K+ vectors for 2W + 1 = 385 inputs the
smallest wins (1e-2 and 1e-6 measured the same KL on SmolLM2); with a few hundred, least squares fits noise and
new text's remainders outgrow the steps' range (a 500-vector fit coded real KV at 12.9 bits/value, mostly raw
tokens): a larger ridge wins there."""
BISECTIONS = 14
"""Bisection steps of ``c`` with the design held, in a bracket of 16x: 2^-10 of an octave, far below what shows."""


def design(vectors: torch.Tensor, metric: torch.Tensor, shape: torch.Tensor, c: float, margin: float):
    """(record, step floors (L, 2, W)) for steps ``c * shape`` (L, 2): predictor, basis and steps fitted layer by
    layer in closed loop on ``vectors`` (L, 2, N, W) in ``metric`` (L, 2, W, W); a floor keeps a coefficient's
    range within 127 steps (times ``margin``)."""
    layers, _, count, width = vectors.shape
    floors = np.zeros((layers, 2, width), np.float32)
    steps, mean = np.zeros((layers, 2, width), np.float32), np.zeros((layers, 2, width), np.float32)
    decode = np.zeros((layers, 2, width, width), np.float32)
    predict = np.zeros((layers - 1, 2, 2 * width, width), np.float32)
    decoded = None
    for layer in range(layers):
        x = vectors[layer].double()  # (2, N, W)
        remainder = unseen = x
        if decoded is not None:
            inputs = torch.cat([features(decoded).double(), torch.ones(count, 1, dtype=torch.float64)], -1)
            solution, unseen = _predictor(inputs, x)  # (2, 2W + 1, W): weights, then the bias row
            predict[layer - 1] = solution[:, :-1].float().numpy()
            remainder = x - inputs @ solution
            mean[layer] = solution[:, -1].float().numpy()
        rest_mean, basis = fit_basis(remainder[None], metric[layer][None])
        mean[layer] += rest_mean[0]
        decode[layer] = basis[0]
        prediction = torch.from_numpy(mean[layer])[:, None] + (
            0 if decoded is None else features(decoded) @ torch.from_numpy(predict[layer - 1])
        )
        encode = torch.linalg.inv(torch.from_numpy(decode[layer]).double())
        coefs = (vectors[layer] - prediction) @ encode.float()
        # the range of held-out remainders too: a predictor meets new text less well than the text it was fitted on
        unseen_coefs = (unseen - torch.from_numpy(mean[layer]).double()[:, None]) @ encode
        peaks = torch.maximum(coefs.abs().amax(dim=1), unseen_coefs.abs().amax(dim=1).float())
        floors[layer] = (peaks * margin / MAX_COEFFICIENT).numpy()
        steps[layer] = np.maximum(c * shape[layer][:, None].numpy(), floors[layer])
        q = torch.round(coefs / torch.from_numpy(steps[layer])[:, None]).clamp(-MAX_COEFFICIENT, MAX_COEFFICIENT)
        decoded = (q * torch.from_numpy(steps[layer])[:, None]) @ torch.from_numpy(decode[layer]) + prediction
    return CrossLayer(steps, mean, decode, predict), floors


def _solve(inputs: torch.Tensor, x: torch.Tensor, ridge: float) -> torch.Tensor:
    gram = inputs.T @ inputs
    gram += ridge * torch.diag(torch.diagonal(gram))
    return torch.linalg.solve(gram, inputs.T @ x)


def _predictor(inputs: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge least squares ``inputs`` (N, F) -> ``x`` (2, N, W) with the ridge of ``RIDGES`` whose fit on one half
    of the vectors best predicts the other (both ways round); also those held-out remainders (2, N, W) at it."""
    half = inputs.shape[0] // 2
    parts = [(slice(0, half), slice(half, None)), (slice(half, None), slice(0, half))]

    def held_out(ridge: float) -> torch.Tensor:
        return torch.cat([x[:, b] - inputs[b] @ _solve(inputs[a], x[:, a], ridge) for a, b in parts], 1)

    ridge = min(RIDGES, key=lambda r: float(held_out(r).pow(2).sum()))
    return _solve(inputs, x, ridge), held_out(ridge)


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
    (L, 2, W, W): designed at ``c = start``, ``c`` bisected to ``bits_per_value`` with that design held, designed
    again there and bisected once more in a narrower bracket (the design shifts the rate a little)."""
    shape = torch.from_numpy(sensitivity**-ALPHA).float()
    subset = vectors[:, :, ::2]  # the rate of every other token: the bisection's cost halves, its answer holds
    c = start
    for width in (4.0, 1.25):
        record, floors = design(vectors, metric, shape, c, margin)
        low, high = math.log(c / width), math.log(c * width)
        for _ in range(BISECTIONS):
            middle = (low + high) / 2
            bits = _bits(_rescaled(record, floors, shape, math.exp(middle)), subset)
            low, high = (middle, high) if bits > bits_per_value else (low, middle)
        c = math.exp(high)
        log.info("cross-layer steps c=%.4f bits_per_value=%.3f", c, bits)
    return design(vectors, metric, shape, c, margin)[0]
