"""The torch side of the codec: checks a KV tensor against its layout and moves its bits to and from numpy.

Levels work on numpy arrays of the raw dtype bits (bf16 has no numpy dtype, so it travels as ``uint16``).
"""

from __future__ import annotations

import numpy as np
import torch

from cachegen.errors import LayoutMismatch
from cachegen.spec import KVLayout

TORCH_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
# Same-width unsigned-bit views (torch has uint16/uint32 views since 2.3); FORMAT.md stores them little-endian.
_BITS_TORCH = {2: torch.uint16, 4: torch.uint32}
BITS_NUMPY = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def check_kv(kv: torch.Tensor, layout: KVLayout, what: str = "kv") -> int:
    """Return the token count of ``kv`` after checking its rank, dims and dtype against ``layout``."""
    if kv.dim() != 5:
        raise LayoutMismatch(f"{what} must have 5 dims {layout.shape(0)}, got shape {tuple(kv.shape)}")
    num_tokens = kv.shape[3]
    if tuple(kv.shape) != layout.shape(num_tokens):
        raise LayoutMismatch(f"{what} shape {tuple(kv.shape)} != layout shape {layout.shape(num_tokens)}")
    if kv.dtype != TORCH_DTYPES[layout.dtype]:
        raise LayoutMismatch(f"{what} dtype {kv.dtype} != layout dtype {layout.dtype}")
    return num_tokens


def kv_bits(kv: torch.Tensor) -> np.ndarray:
    """The raw bits of a (possibly CUDA, possibly strided) KV tensor as a C-contiguous unsigned numpy array."""
    host = kv.detach().to("cpu").contiguous()
    return host.view(_BITS_TORCH[host.element_size()]).numpy()


def kv_values(kv: torch.Tensor) -> np.ndarray:
    """The KV values as float32 numpy, layout order (lossy levels quantize from these)."""
    return kv.detach().to("cpu", torch.float32).contiguous().numpy()


def output_tensor(layout: KVLayout, num_tokens: int, out: torch.Tensor | None) -> torch.Tensor:
    """The caller's destination after checking it, or a fresh CPU tensor of the frame's shape."""
    if out is None:
        return torch.empty(layout.shape(num_tokens), dtype=TORCH_DTYPES[layout.dtype])
    got = check_kv(out, layout, "out")
    if got != num_tokens:
        raise LayoutMismatch(f"out holds {got} tokens, the frame {num_tokens}")
    return out


def write_bits(out: torch.Tensor, bits: np.ndarray) -> torch.Tensor:
    """Copy decoded dtype bits (layout order) into ``out`` on whatever device it lives."""
    bits = bits.reshape(tuple(out.shape))
    if out.device.type == "cpu" and out.is_contiguous():
        # One copy straight into the destination; also works for read-only sources such as a frame's bytes.
        np.copyto(out.view(_BITS_TORCH[out.element_size()]).numpy(), bits, casting="no")
        return out
    source = torch.from_numpy(np.ascontiguousarray(bits) if bits.flags.writeable else bits.copy())
    out.copy_(source.view(out.dtype))
    return out


def write_values(out: torch.Tensor, values: np.ndarray) -> torch.Tensor:
    """Copy decoded float32 values (layout order) into ``out``, rounding to its dtype."""
    out.copy_(torch.from_numpy(values.reshape(tuple(out.shape))))
    return out
