"""Symbols of the coded levels (FORMAT.md §5.2, §5.3): exact float32 / integer rules shared by every implementation.

Quantized levels: one scale per (layer, K|V, token) = max |x| over heads and channels, rounded to bf16;
``q = clamp(rint(x * (half / scale)), -half, half)`` with ``half = bins / 2 - 1``; symbol ``q + half``.
Lossless level: each 16-bit value is two symbols, high byte then low byte.
"""

from __future__ import annotations

import numpy as np

# Stream granularity (FORMAT.md §5.2): 32 tokens of one (layer, K|V, head) = 2048 symbols at head_dim 64,
# where rANS's ~35-bit stream overhead is ~0.5%, and a 256-token chunk gives the GPU 8 streams per head.
STREAM_TOKENS = 32


def f32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 to bf16 (round half to even, as torch and the C++ core do); NaN stays NaN."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.where(np.isnan(values), np.uint32(0x7FC0), rounded).astype(np.uint16)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def token_scales(values: np.ndarray) -> np.ndarray:
    """bf16 bits of max |x| per (layer, K|V, token): values (layers, 2, heads, tokens, dim) -> (layers, 2, tokens)."""
    peak = np.abs(values).max(axis=(2, 4))
    bits = f32_to_bf16_bits(peak)
    # Round up when RNE went down so that |x| <= scale; the clamp in ``quantize`` covers the rest anyway.
    is_low = bf16_bits_to_f32(bits) < peak
    return np.where(is_low, bits + np.uint16(1), bits).astype(np.uint16)


def _step_factors(scales: np.ndarray, half: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per (layer, K|V, token): ``inv = half / scale`` and ``step = scale / half`` in float32 (0 for scale 0)."""
    scale = bf16_bits_to_f32(scales)
    half32 = half.astype(np.float32)[:, :, None]
    is_zero = scale == 0  # an all-zero vector: every symbol is q = 0, no division by zero
    safe = np.where(is_zero, np.float32(1), scale)
    inv = np.where(is_zero, np.float32(0), half32 / safe).astype(np.float32)
    step = np.where(is_zero, np.float32(0), safe / half32).astype(np.float32)
    return inv, step


def quantize(values: np.ndarray, scales: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Symbols (layers, 2, heads, tokens, dim) in [0, bins-2] of float32 ``values`` under bf16 ``scales``."""
    half = bins.astype(np.int64) // 2 - 1
    inv, _ = _step_factors(scales, half)
    scaled = values.astype(np.float32) * inv[:, :, None, :, None]
    q = np.clip(np.rint(scaled), -half[:, :, None, None, None], half[:, :, None, None, None])
    return (q.astype(np.int64) + half[:, :, None, None, None]).astype(np.int32)


def dequantize(symbols: np.ndarray, scales: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """float32 values ``(symbol - half) * (scale / half)``: one f32 multiply, so every core agrees exactly."""
    half = bins.astype(np.int64) // 2 - 1
    _, step = _step_factors(scales, half)
    q = (symbols.astype(np.int64) - half[:, :, None, None, None]).astype(np.float32)
    return q * step[:, :, None, :, None]


def error_bound(scales: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Largest |x - x'| the quantizer allows per (layer, K|V, token): half a step (x within the scale)."""
    half = bins.astype(np.int64) // 2 - 1
    _, step = _step_factors(scales, half)
    return step / 2


def split_bytes(bits: np.ndarray) -> np.ndarray:
    """Lossless symbols: (..., dim) uint16 -> (..., 2*dim) with high byte then low byte per value."""
    out = np.empty(bits.shape[:-1] + (2 * bits.shape[-1],), np.int32)
    out[..., 0::2] = bits >> np.uint16(8)
    out[..., 1::2] = bits & np.uint16(0xFF)
    return out


def join_bytes(symbols: np.ndarray) -> np.ndarray:
    """Inverse of ``split_bytes``."""
    high = symbols[..., 0::2].astype(np.uint16)
    return (high << np.uint16(8)) | symbols[..., 1::2].astype(np.uint16)
