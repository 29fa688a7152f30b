"""The only door to the compiled codec core (STYLE §6): CPU extension always when built, CUDA where built.

Every function here takes numpy arrays already checked by the caller's frame parsing; the extension re-checks
sizes and table indexes, so a bug on this side raises ValueError rather than reading out of bounds.
"""

from __future__ import annotations

import ctypes
import importlib
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from cachegen.codec.tables import LevelTables


def _load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:  # not built (pure-Python install): the numpy reference path serves instead
        return None


def _load_cuda() -> ctypes.CDLL | None:
    """The torch-free CUDA library `make gpu-check` builds next to this file (kernels/cuda/codec_cuda.h)."""
    path = Path(__file__).with_name("libcachegen_cuda.so")
    try:
        return ctypes.CDLL(str(path)) if path.exists() else None
    except OSError:  # built on another machine or no CUDA runtime here
        return None


_CPU = _load("cachegen.codec._cpu")
_CUDA = _load_cuda()


def has_cpu() -> bool:
    return _CPU is not None


def has_cuda() -> bool:
    """True when the CUDA binding is built and a device is visible (GPU decode path)."""
    return _CUDA is not None and bool(_CUDA.cachegen_cuda_device_count()) and torch.cuda.is_available()


def constants() -> dict[str, int]:
    """Numbers the extension was compiled with (kernels/include/cachegen/spec.h), for the parity test."""
    assert _CPU is not None, "CPU extension not built"
    names = ("MAGIC", "FORMAT_VERSION", "PRECISION", "STREAM_TOKENS", "HEADER_SIZE")
    return {name: getattr(_CPU, name) for name in names}


def _desc(entry: LevelTables, shape: tuple[int, ...]) -> tuple:
    layers, _, heads, num_tokens, per_token = shape
    num_tables, alphabet = entry.tables.freq.shape
    args = (layers, heads, num_tokens, per_token, alphabet, num_tables)
    freq = np.ascontiguousarray(entry.tables.freq, "<u4")
    return args, np.ascontiguousarray(entry.table_map, "<u4"), freq, np.ascontiguousarray(entry.tables.cum, "<u4")


def encode_symbols(symbols: np.ndarray, entry: LevelTables, num_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Same contract and bytes as ``coded.encode_symbols``."""
    assert _CPU is not None
    args, table_map, freq, cum = _desc(entry, symbols.shape)
    sizes, words = _CPU.encode_symbols(args, table_map, freq, cum, np.ascontiguousarray(symbols, "<i4"), num_threads)
    return np.frombuffer(sizes, "<u4"), np.frombuffer(words, "<u4")


def decode(
    words: np.ndarray, sizes: np.ndarray, entry: LevelTables, shape: tuple[int, ...], fused: tuple | None
) -> tuple[np.ndarray, int, int]:
    """Decode streams; ``fused=None`` gives int32 symbols of ``shape``, ``(scales, bins)`` or ``()`` gives 16-bit
    values (bf16-dequantized, or lossless bytes joined). Returns (array, status, first bad stream)."""
    assert _CPU is not None
    args, table_map, freq, cum = _desc(entry, shape)
    if fused is None:
        out = np.empty(shape, np.int32)
        scales = bins = None
    else:
        dim = shape[4] if fused else shape[4] // 2
        out = np.empty(shape[:4] + (dim,), np.uint16)
        scales, bins = (np.ascontiguousarray(f, "<u2") for f in fused) if fused else (None, None)
    status, bad = _CPU.decode(
        args, table_map, freq, cum, entry.slots, np.ascontiguousarray(words, "<u4"),
        np.ascontiguousarray(sizes, "<u4"), scales, bins, out, 0 if fused is None else 1, 1,
    )  # fmt: skip
    return out, status, bad


def decode_cuda(
    words: np.ndarray, sizes: np.ndarray, entry: LevelTables, shape: tuple[int, ...], fused: tuple, out: torch.Tensor
) -> np.ndarray:
    """GPU twin of ``decode(..., fused)``: writes 16-bit values into the CUDA tensor ``out`` (contiguous, shape
    (L, 2, H, T, D)); returns per-stream status codes. Tables are uploaded on every call (a per-model device cache
    is the next step once a GPU run shows it matters)."""
    assert _CUDA is not None
    layers, _, heads, num_tokens, per_token = shape
    device = out.device

    def put(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device)

    offsets = np.concatenate([[0], np.cumsum(sizes.astype(np.int64))[:-1]]).astype(np.int64)
    as_i32 = [np.ascontiguousarray(a, np.uint32).view(np.int32) for a in (entry.table_map, entry.tables.freq,
                                                                          entry.tables.cum, words)]  # fmt: skip
    keep = [put(a) for a in as_i32] + [put(offsets), put(np.ascontiguousarray(sizes, np.uint32).view(np.int32))]
    as_i16 = [np.ascontiguousarray(a, np.uint16).view(np.int16) for a in fused]
    scales, bins = (put(as_i16[0]), put(as_i16[1])) if fused else (None, None)
    status = torch.zeros(sizes.size, dtype=torch.int32, device=device)
    pointer = [ctypes.c_void_p(t.data_ptr()) for t in keep]
    error = _CUDA.cachegen_decode_values_cuda(
        ctypes.c_uint32(layers), ctypes.c_uint32(heads), ctypes.c_uint32(num_tokens), ctypes.c_uint32(per_token),
        pointer[0], pointer[1], pointer[2], ctypes.c_uint32(entry.tables.freq.shape[1]), pointer[3], pointer[4],
        pointer[5], ctypes.c_void_p(scales.data_ptr() if scales is not None else 0),
        ctypes.c_void_p(bins.data_ptr() if bins is not None else 0), ctypes.c_void_p(out.data_ptr()),
        ctypes.c_void_p(status.data_ptr()), ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream),
    )  # fmt: skip
    if error:
        raise RuntimeError(f"CUDA decode launch failed with cudaError {error}")
    return status.cpu().numpy()
