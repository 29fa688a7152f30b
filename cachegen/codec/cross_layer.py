"""The cross-layer predicted transform level "pca2x" (FORMAT.md §5.7): code what the previous layer cannot predict.

A token's keys and values at layer l are projections of a residual stream that changes little from layer l - 1,
so a linear map of layer l - 1's decoded keys and values predicts most of layer l's: measured on SmolLM2 (three
documents, the codec's metric), 75-90% of the variance of every layer but the first. The level codes, per layer and
K|V, only the remainder ``x - mean - features @ predict`` in a PCA basis of its own, with steps of its own.

The encoder predicts from the *decoded* previous layer (closed loop), so quantization errors never accumulate
across layers: each layer's error is its own coefficients' alone, the bound of ``transform.error_bound``. Tokens
are independent (prediction runs down the layers of one token), and escaped tokens travel raw at every layer, as
on levels 6-8. The record is fitted by ``cachegen.codec.cross_layer_fit``.
"""

from __future__ import annotations

import numpy as np
import torch

from cachegen.codec.transform import MAX_COEFFICIENT, CrossLayer, Transform, from_vectors, to_vectors
from cachegen.spec import KVLayout


def features(previous: torch.Tensor) -> torch.Tensor:
    """(2, T, W) decoded keys and values of one layer -> (T, 2W) prediction features: keys first (FORMAT.md §5.7)."""
    return torch.cat([previous[0], previous[1]], -1)


def code_vectors(x: torch.Tensor, record: CrossLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, 2, T, W) float32 vectors -> (coefficients / step, their rounding, not yet clamped), in closed loop."""
    steps, mean = torch.from_numpy(record.steps)[:, :, None], torch.from_numpy(record.mean)[:, :, None]
    encode, decode = torch.from_numpy(record.encode_matrix), torch.from_numpy(record.decode_matrix)
    predict = torch.from_numpy(record.predict_matrix)
    ratio, q = torch.empty_like(x), torch.empty_like(x)
    decoded = None
    for layer in range(x.shape[0]):
        prediction = mean[layer] + (0 if decoded is None else features(decoded) @ predict[layer - 1])
        ratio[layer] = (x[layer] - prediction) @ encode[layer] / steps[layer]
        q[layer] = torch.round(ratio[layer])  # round half to even
        kept = q[layer].clamp(-MAX_COEFFICIENT, MAX_COEFFICIENT)  # a token beyond travels raw: its chain is moot
        decoded = (kept * steps[layer]) @ decode[layer] + prediction  # what the decoder will have
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
    steps, mean, decode, predict = _on_device(transform.cross_layer[level], device)
    wide = torch.float32 if device.type == "cpu" else torch.float64
    x = (y * steps[:, :, None]).to(wide) @ decode.to(wide) + mean[:, :, None].to(wide)
    predict = predict.to(wide)
    for layer in range(1, layers):
        x[layer] += features(x[layer - 1]) @ predict[layer - 1]
    return from_vectors(x.float(), layout, transform.inv_freq, token_start)


def _on_device(record: CrossLayer, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(steps, mean, decode_matrix, predict_matrix) as float32 tensors on ``device``: views on the CPU, uploaded
    once elsewhere."""
    arrays = (record.steps, record.mean, record.decode_matrix, record.predict_matrix)
    if device.type == "cpu":
        return tuple(torch.from_numpy(a) for a in arrays)
    key = str(device)
    if key not in record.device_copies:
        record.device_copies[key] = tuple(torch.from_numpy(a).to(device) for a in arrays)
    return record.device_copies[key]
