"""The only door to the compiled codec core (STYLE §6): CPU extension always when built, CUDA where built.

Every function here takes numpy arrays already checked by the caller's frame parsing; the extension re-checks
sizes and table indexes, so a bug on this side raises ValueError rather than reading out of bounds.
"""

from __future__ import annotations

import ctypes
import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from cachegen.codec.tables import LevelTables
from cachegen.codec.transform import Transform


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


def has_cuda_symbols() -> bool:
    """True when the CUDA binding also decodes levels 6-8's streams (``decode_symbols_cuda``; a newer build)."""
    return has_cuda() and hasattr(_CUDA, "cachegen_decode_symbols_cuda")


def has_token_shift() -> bool:
    """True when the CPU extension takes ``token_shift`` in ``encode_symbols`` and ``decode`` (feature test)."""
    return _CPU is not None and bool(getattr(_CPU, "HAS_TOKEN_SHIFT", 0))


def has_simd_decode() -> bool:
    """True when the CPU extension decodes with its AVX-512 lanes on this CPU (kernels/cpu/lanes_avx512.h)."""
    return _CPU is not None and bool(getattr(_CPU, "HAS_SIMD_DECODE", 0))


def vector_lanes(entry: LevelTables, shape: tuple[int, ...]) -> bool:
    """True when ``decode`` (unshifted, ``simd=True``) takes this level's runs of full stream blocks with the AVX-512
    lanes on this CPU: rows of <= 62 symbols, or 255-symbol rows whose probability lies almost all within the
    register window around the middle symbol (pca3, pca2; not q8, lossless or token-shifted levels)."""
    if _CPU is None or not has_simd_decode() or not hasattr(_CPU, "vector_lanes"):
        return False
    args, table_map, freq, cum = _desc(entry, shape)
    return bool(_CPU.vector_lanes(args, table_map, freq, cum, entry.slots, entry.bounds))


def has_inverse_transform() -> bool:
    """True when the CPU extension has ``inverse_transform`` (an older build lacks it: the torch path serves)."""
    return _CPU is not None and hasattr(_CPU, "inverse_transform")


def inverse_transform(
    symbols: np.ndarray, transform: Transform, level: int, token_start: int, classes: np.ndarray | None,
    is_bf16: bool, num_threads: int = 1,
) -> np.ndarray:  # fmt: skip
    """16-bit KV bits (L, 2, H, T, D) of a level 6-8 frame's symbols (same shape, each < 255): what
    ``transform.dequantize`` gives rounded to bf16 (``is_bf16``) or f16, equal within f32 rounding (FORMAT.md
    §5.5); ``classes`` (L, T) on level 8. Escaped tokens are the caller's to overwrite."""
    assert _CPU is not None
    layers, _, heads, num_tokens, dim = symbols.shape
    out = np.empty(symbols.shape, np.uint16)
    floats = [np.ascontiguousarray(a, "<f4") for a in (transform.steps[level], transform.mean,
                                                        transform.decode_matrix, transform.inv_freq)]  # fmt: skip
    shape = (layers, heads, dim, num_tokens, token_start, is_bf16, num_threads)
    cls = None if classes is None else np.ascontiguousarray(classes, np.uint8)
    _CPU.inverse_transform(shape, np.ascontiguousarray(symbols, "<i4"), *floats, cls, out)
    return out


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


def _shift_arg(token_shift: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """``token_shift`` as the extension takes it: None, or C-contiguous int8 (layers, num_tokens); ValueError else."""
    if token_shift is None:
        return None
    expected = (shape[0], shape[3])
    if token_shift.dtype != np.int8 or token_shift.shape != expected:
        raise ValueError(f"token_shift must be int8 {expected}, got {token_shift.dtype} {token_shift.shape}")
    return np.ascontiguousarray(token_shift)


def encode_symbols(
    symbols: np.ndarray, entry: LevelTables, num_threads: int = 1, token_shift: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Same contract and bytes as ``coded.encode_symbols``. ``token_shift`` (changes the bitstream): None, or int8
    (layers, num_tokens) moving the table of every symbol of (layer, token) from ``table_map[l, kv, h, c]`` to that
    plus ``token_shift[l, t]``; ValueError unless every such table exists. ``num_threads``: runtime only."""
    assert _CPU is not None
    args, table_map, freq, cum = _desc(entry, symbols.shape)
    shift = _shift_arg(token_shift, symbols.shape)
    symbols = np.ascontiguousarray(symbols, "<i4")
    sizes, words = _CPU.encode_symbols(args, table_map, freq, cum, symbols, num_threads, shift)
    return np.frombuffer(sizes, "<u4"), np.frombuffer(words, "<u4")


def decode(
    words: np.ndarray,
    sizes: np.ndarray,
    entry: LevelTables,
    shape: tuple[int, ...],
    fused: tuple | None,
    num_threads: int = 1,
    token_shift: np.ndarray | None = None,
    simd: bool = True,
) -> tuple[np.ndarray, int, int]:
    """Decode streams; ``fused=None`` gives int32 symbols of ``shape``, ``(scales, bins)`` or ``()`` gives 16-bit
    values (bf16-dequantized, or lossless bytes joined). Returns (array, status, first bad stream).
    ``token_shift``: as ``encode_symbols`` took it (None, or int8 (layers, num_tokens)); symbols only, so
    ValueError with ``fused`` not None. ``simd=False`` keeps to the portable decode loop (same results)."""
    assert _CPU is not None
    if token_shift is not None and fused is not None:
        raise ValueError("token_shift decodes to symbols only: fused must be None")
    args, table_map, freq, cum = _desc(entry, shape)
    shift = _shift_arg(token_shift, shape)
    if fused is None:
        out = np.empty(shape, np.int32)
        scales = bins = None
    else:
        dim = shape[4] if fused else shape[4] // 2
        out = np.empty(shape[:4] + (dim,), np.uint16)
        scales, bins = (np.ascontiguousarray(f, "<u2") for f in fused) if fused else (None, None)
    status, bad = _CPU.decode(
        args, table_map, freq, cum, entry.slots, entry.bounds, np.ascontiguousarray(words, "<u4"),
        np.ascontiguousarray(sizes, "<u4"), scales, bins, out, 0 if fused is None else 1, num_threads, shift, simd,
    )  # fmt: skip
    return out, status, bad


def device_tables(entry: LevelTables, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(table_map, cum, slots) of ``entry`` on ``device``, uploaded once and kept with the tables."""
    key = str(device)
    if key not in entry.device_copies:
        arrays = (entry.table_map.astype("<u4").view(np.int32), entry.tables.cum.astype("<u4").view(np.int32),
                  np.ascontiguousarray(entry.slots, np.uint8))  # fmt: skip
        entry.device_copies[key] = tuple(torch.from_numpy(a).to(device) for a in arrays)
    return entry.device_copies[key]


@dataclass(frozen=True)
class CudaBatch:
    """One frame's streams on the GPU, ready to launch: what ``decode_cuda`` uploads per frame."""

    shape: tuple[int, ...]
    tables: tuple[torch.Tensor, ...]
    alphabet: int
    words: torch.Tensor
    offsets: torch.Tensor
    sizes: torch.Tensor
    scales: torch.Tensor | None
    bins: torch.Tensor | None


def upload_cuda(
    words: np.ndarray, sizes: np.ndarray, entry: LevelTables, shape: tuple[int, ...], fused: tuple, device
) -> CudaBatch:
    """Copy a frame's words, then its stream offsets, sizes and scales in one more transfer (tables are memoized)."""
    offsets = np.concatenate([[0], np.cumsum(sizes.astype(np.int64))[:-1]]).astype("<i8")
    parts = [offsets.view("<u4"), np.ascontiguousarray(sizes, "<u4"), np.ascontiguousarray(words, "<u4")]
    if fused:  # u16 arrays of even length ((layers, 2, T) scales and (layers, 2) bins), carried as u32 pairs
        parts += [np.ascontiguousarray(f, "<u2").reshape(-1).view("<u4") for f in fused]
    small = torch.from_numpy(np.concatenate(parts[:2] + parts[3:]).view(np.int32)).to(device)
    pieces = list(torch.split(small, [p.size for p in parts[:2] + parts[3:]]))
    words_t = torch.from_numpy(parts[2].view(np.int32)).to(device)  # the bulk: one copy, no concatenation
    scales_t = pieces[2].view(torch.int16) if fused else None
    bins_t = pieces[3].view(torch.int16) if fused else None
    return CudaBatch(shape, device_tables(entry, device), int(entry.tables.cum.shape[1]),
                     words_t, pieces[0].view(torch.int64), pieces[1], scales_t, bins_t)  # fmt: skip


def launch_cuda(batch: CudaBatch, out: torch.Tensor, status: torch.Tensor) -> None:
    """Enqueue the decode kernel on the current stream: 16-bit values into ``out`` (contiguous (L, 2, H, T, D)),
    one status code per stream into ``status``. Asynchronous: the caller synchronizes."""
    assert _CUDA is not None
    layers, _, heads, num_tokens, per_token = batch.shape
    table_map, cum, slots = batch.tables

    def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
        return ctypes.c_void_p(t.data_ptr() if t is not None else 0)

    error = _CUDA.cachegen_decode_values_cuda(
        ctypes.c_uint32(layers), ctypes.c_uint32(heads), ctypes.c_uint32(num_tokens), ctypes.c_uint32(per_token),
        ptr(table_map), ptr(cum), ptr(slots), ctypes.c_uint32(batch.alphabet), ptr(batch.words), ptr(batch.offsets),
        ptr(batch.sizes), ptr(batch.scales), ptr(batch.bins), ptr(out), ptr(status),
        ctypes.c_void_p(torch.cuda.current_stream(out.device).cuda_stream),
    )  # fmt: skip
    if error:
        raise RuntimeError(f"CUDA decode launch failed with cudaError {error}")


def decode_cuda(
    words: np.ndarray, sizes: np.ndarray, entry: LevelTables, shape: tuple[int, ...], fused: tuple, out: torch.Tensor
) -> np.ndarray:
    """GPU twin of ``decode(..., fused)``: writes 16-bit values into the CUDA tensor ``out`` (contiguous, shape
    (L, 2, H, T, D)); returns per-stream status codes (synchronizes)."""
    batch = upload_cuda(words, sizes, entry, shape, fused, out.device)
    status = torch.zeros(sizes.size, dtype=torch.int32, device=out.device)
    launch_cuda(batch, out, status)
    return status.cpu().numpy()


def decode_symbols_cuda(
    words: np.ndarray, sizes: np.ndarray, entry: LevelTables, shape: tuple[int, ...],
    token_shift: np.ndarray | None, device: torch.device,
) -> tuple[torch.Tensor, np.ndarray]:  # fmt: skip
    """GPU twin of ``decode(..., None, token_shift=...)`` for levels 6-8: (uint8 symbols (L, 2, H, T, P) on
    ``device``, per-stream status codes). ``token_shift`` (L, T) moves each token's rows (FORMAT.md §5.6).
    Synchronizes (for the statuses)."""
    assert _CUDA is not None
    layers, _, heads, num_tokens, per_token = shape
    batch = upload_cuda(words, sizes, entry, shape, (), device)
    table_map, cum, slots = batch.tables
    small = [np.ascontiguousarray(entry.bins, "<u2").reshape(-1).view(np.uint8)]
    if token_shift is not None:
        small.append(np.ascontiguousarray(token_shift, np.int8).reshape(layers, num_tokens).view(np.uint8).ravel())
    pieces = torch.split(torch.from_numpy(np.concatenate(small)).to(device), [a.size for a in small])
    shift_t = pieces[1] if token_shift is not None else None
    out = torch.empty(shape, dtype=torch.uint8, device=device)
    status = torch.zeros(sizes.size, dtype=torch.int32, device=device)

    def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
        return ctypes.c_void_p(t.data_ptr() if t is not None else 0)

    error = _CUDA.cachegen_decode_symbols_cuda(
        ctypes.c_uint32(layers), ctypes.c_uint32(heads), ctypes.c_uint32(num_tokens), ctypes.c_uint32(per_token),
        ptr(table_map), ptr(cum), ptr(slots), ctypes.c_uint32(batch.alphabet),
        ctypes.c_uint32(entry.tables.cum.shape[0]), ptr(batch.words), ptr(batch.offsets), ptr(batch.sizes),
        ptr(pieces[0]), ptr(shift_t), ptr(out), ptr(status),
        ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream),
    )  # fmt: skip
    if error:
        raise RuntimeError(f"CUDA symbol decode launch failed with cudaError {error}")
    return out, status.cpu().numpy()
