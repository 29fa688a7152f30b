"""Sections of transform-coded frames (FORMAT.md §5.5, §5.6): ESCAPES (tokens sent raw) and, on the
token-adaptive level, TOKEN_CLASSES beside the rANS streams."""

from __future__ import annotations

import struct

import numpy as np
import torch

from cachegen.codec import _ext, cross_layer, token_classes, transform
from cachegen.codec.bitstream import Frame, dtype_bytes
from cachegen.codec.tensors import BITS_NUMPY, TORCH_DTYPES, kv_bits
from cachegen.errors import FormatError
from cachegen.spec import KVLayout


def escapes_payload(kv: torch.Tensor, escaped: np.ndarray) -> bytes:
    """``u32 n``, ``n`` ascending u16 token indices, then those tokens' bits in (l, kv, h, token, d) order."""
    bits = kv_bits(kv)[:, :, :, escaped.astype(np.int64)]
    little = np.ascontiguousarray(bits.astype(bits.dtype.newbyteorder("<"), copy=False))
    return struct.pack("<I", escaped.size) + escaped.astype("<u2").tobytes() + little.tobytes()


def read_escapes(view: memoryview, frame: Frame, layout: KVLayout) -> tuple[np.ndarray, np.ndarray]:
    """(token indices, their bits (L, 2, H, n, D)) of the ESCAPES section, every size and index checked."""
    section = frame.sections[1]
    num_tokens, width = frame.header.num_tokens, dtype_bytes(layout)
    if section.size < 4:
        raise FormatError("escapes", section.offset, section.size, "needs a 4-byte count")
    (count,) = struct.unpack_from("<I", view, section.offset)
    per_token = layout.values_per_token * width
    if count > num_tokens or section.size != 4 + 2 * count + count * per_token:
        raise FormatError("escapes", section.offset, count, f"{section.size} bytes cannot hold {count} tokens")
    indices = np.frombuffer(view, "<u2", count, section.offset + 4).astype(np.int64)
    if count and (indices[-1] >= num_tokens or np.any(np.diff(indices) <= 0)):
        raise FormatError("escapes", section.offset + 4, indices.tolist()[:8], "indices must ascend below T")
    shape = (layout.num_layers, 2, layout.num_kv_heads, count, layout.head_dim)
    bits = np.frombuffer(view, BITS_NUMPY[width], int(np.prod(shape)), section.offset + 4 + 2 * count)
    return indices, bits.reshape(shape)


def read_classes(view: memoryview, frame: Frame, layout: KVLayout) -> np.ndarray:
    """(L, T) int64 step classes of the TOKEN_CLASSES section (the third), size and padding checked."""
    section = frame.sections[2]
    data = view[section.offset : section.offset + section.size]
    return token_classes.unpack(data, layout.num_layers, frame.header.num_tokens, section.offset)


def decode_values(
    symbols: np.ndarray | torch.Tensor, tables, level: int, frame: Frame, view: memoryview, layout: KVLayout,
    classes: np.ndarray | None = None, use_ext: bool = False, device: torch.device | str = "cpu",
):  # fmt: skip
    """The frame's KV as a tensor of the layout's dtype on ``device``: dequantized coefficients, escaped tokens
    raw. On a GPU the inverse transform runs there (torch), on symbols already there (a tensor, from the CUDA
    kernel) or uploaded; on the CPU, with ``use_ext``, levels 6-8 in 16-bit layouts take the extension's (equal to
    torch's within f32 rounding). The cross-layer level's chain always runs in torch."""
    header = frame.header
    indices, bits = read_escapes(view, frame, layout)
    dtype, device = TORCH_DTYPES[layout.dtype], torch.device(device)
    on_host = device.type != "cpu" and not torch.is_tensor(symbols)
    coded = torch.from_numpy(symbols.astype(np.uint8)) if on_host else symbols  # < 255: a GPU gets bytes
    if level in tables.transform.cross_layer:  # the chain down the layers: torch's matrix products (FORMAT.md §5.7)
        values = cross_layer.dequantize(coded, tables.transform, level, layout, header.token_start, device)
        out = values.to(dtype)
    elif device.type == "cpu" and use_ext and layout.dtype != "float32" and _ext.has_inverse_transform():
        is_bf16 = layout.dtype == "bfloat16"
        args = (symbols, tables.transform, level, header.token_start, classes, is_bf16, torch.get_num_threads())
        out = torch.from_numpy(_ext.inverse_transform(*args)).view(dtype)
    else:
        values = transform.dequantize(coded, tables.transform, level, layout, header.token_start, classes, device)
        out = values.to(dtype)
    if indices.size:
        raw = torch.from_numpy(bits.copy()).view(out.dtype).to(device)
        out[:, :, :, torch.from_numpy(indices).to(device)] = raw
    return out
