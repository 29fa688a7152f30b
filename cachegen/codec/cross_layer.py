"""The cross-layer predicted transform level "pca2x" (FORMAT.md §5.7): code what earlier layers cannot predict.

A token's keys and values at layer l are projections of a residual stream that changes little from layer to layer,
so a linear map of the layers before predicts most of layer l's: measured on SmolLM2 (three documents, the codec's
metric), layer l - 1's keys and values alone predict 75-90% of the variance of every layer but the first. The level
codes, per layer and K|V, only the remainder ``x - mean - features @ predict`` in a PCA basis of its own, with steps
of its own. The features are the ``depth`` layers before, keys then values, and for values also the same layer's
keys (decoded first): layer 0's values are almost a function of its keys, both projections of one embedding.

The encoder predicts from the *decoded* layers (closed loop), so quantization errors never accumulate across
layers: each layer's error is its own coefficients' alone, the bound of ``transform.error_bound``. Tokens are
independent (prediction runs down the layers of one token), and escaped tokens travel raw at every layer, as on
levels 6-8. The record is fitted by ``cachegen.codec.cross_layer_fit``.
"""

from __future__ import annotations

import numpy as np
import torch

from cachegen.codec.transform import MAX_COEFFICIENT, CrossLayer, Transform, from_vectors, on_device, to_vectors
from cachegen.spec import KVLayout


def sources(layer: int, kind: int, depth: int) -> list[tuple[int, int, int]]:
    """(layer, K|V, row block of the predict matrix) of each feature block of (``layer``, ``kind``) that exists
    (FORMAT.md §5.7): layer l - d's keys (block 2d - 2) and values (2d - 1) for d = 1..depth down to layer 0, then
    for values layer l's keys (block 2 depth)."""
    blocks = [(layer - d, k, 2 * (d - 1) + k) for d in range(1, depth + 1) if layer - d >= 0 for k in (0, 1)]
    return blocks + ([(layer, 0, 2 * depth)] if kind == 1 else [])


def prediction(decoded: torch.Tensor, record: CrossLayer, layer: int, kind: int) -> torch.Tensor | float:
    """(T, W) prediction of (``layer``, ``kind``) from ``decoded`` (L, 2, T, W), whose earlier layers (and, for
    values, this layer's keys) hold what the decoder has; 0 where no feature exists (layer 0's keys)."""
    blocks = sources(layer, kind, record.depth)
    if not blocks:
        return 0.0
    width, matrix = decoded.shape[-1], _arrays(record, decoded.device)[3][layer, kind]
    inputs = torch.cat([decoded[source, k] for source, k, _ in blocks], -1)
    first, last = blocks[0][2], blocks[-1][2]
    if last - first + 1 == len(blocks):  # every layer past the first `depth`: one view, no copy
        return inputs @ matrix[first * width : (last + 1) * width].to(decoded.dtype)
    rows = torch.cat([torch.arange(b * width, (b + 1) * width) for _, _, b in blocks]).to(decoded.device)
    return inputs @ matrix[rows].to(decoded.dtype)


def code_vectors(x: torch.Tensor, record: CrossLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, 2, T, W) float32 vectors -> (coefficients / step, their rounding, not yet clamped), in closed loop."""
    steps, mean = torch.from_numpy(record.steps)[:, :, None], torch.from_numpy(record.mean)[:, :, None]
    encode, decode = torch.from_numpy(record.encode_matrix), torch.from_numpy(record.decode_matrix)
    ratio, q, decoded = torch.empty_like(x), torch.empty_like(x), torch.zeros_like(x)
    for layer in range(x.shape[0]):
        for kind in (0, 1):  # keys first: values read this layer's decoded keys
            guess = mean[layer, kind] + prediction(decoded, record, layer, kind)
            ratio[layer, kind] = (x[layer, kind] - guess) @ encode[layer, kind] / steps[layer, kind]
            q[layer, kind] = torch.round(ratio[layer, kind])  # round half to even
            kept = q[layer, kind].clamp(-MAX_COEFFICIENT, MAX_COEFFICIENT)  # beyond: the token travels raw
            decoded[layer, kind] = (kept * steps[layer, kind]) @ decode[layer, kind] + guess  # the decoder's
    return ratio, q


def quantize(kv: torch.Tensor, transform: Transform, level: int, token_start: int) -> tuple[np.ndarray, np.ndarray]:
    """Symbols (L, 2, H, T, D) int32 and the sorted token indices that travel raw, as ``transform.quantize``."""
    x = to_vectors(kv, transform.inv_freq, token_start)  # (L, 2, T, W) float32, keys de-rotated
    q = code_vectors(x, transform.cross_layer[level])[1]
    sinks = np.arange(x.shape[2]) + token_start < transform.num_sinks
    escaped = np.flatnonzero(sinks | (q.abs() > MAX_COEFFICIENT).any(dim=(0, 1, 3)).numpy())
    q[:, :, escaped] = 0
    layers, _, tokens, _ = q.shape
    symbols = (q.to(torch.int32) + MAX_COEFFICIENT).reshape(layers, 2, tokens, -1, kv.shape[4])
    return symbols.permute(0, 1, 3, 2, 4).contiguous().numpy(), escaped.astype(np.uint16)


def dequantize(
    symbols: np.ndarray | torch.Tensor, transform: Transform, level: int, layout: KVLayout, token_start: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:  # fmt: skip
    """float32 KV (L, 2, H, T, D) of symbols (L, 2, H, T, D) on ``device`` (FORMAT.md §5.7): every layer's
    ``(s - 127) * step @ decode_matrix + mean`` at once, then the predictions down the layers.

    On a GPU the products run in float64, as ``transform.dequantize`` (no TF32 coarsening), and the chain carries
    float64: the format allows f32 or wider."""
    device = torch.device(device)
    q = torch.as_tensor(symbols).to(device, torch.float32) - MAX_COEFFICIENT
    layers, _, heads, tokens, dim = q.shape
    y = q.permute(0, 1, 3, 2, 4).reshape(layers, 2, tokens, heads * dim)
    record = transform.cross_layer[level]
    steps, mean, decode, _ = _arrays(record, device)
    x = (y.to(decode.dtype) * steps[:, :, None]) @ decode + mean[:, :, None]
    for layer in range(layers):
        for kind in (0, 1):
            x[layer, kind] += prediction(x, record, layer, kind)
    return from_vectors(x.float(), layout, transform.inv_freq, token_start)


def _arrays(record: CrossLayer, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(steps, mean, decode_matrix, predict_matrix) on ``device``: float32 views on the CPU, float64 copies uploaded
    once elsewhere (the chain's width there)."""
    arrays = (record.steps, record.mean, record.decode_matrix, record.predict_matrix)
    return on_device(record.device_copies, arrays, device, torch.float64)
