"""``decode``: one frame back to a KV tensor, after checking every byte of it (FORMAT.md §6)."""

from __future__ import annotations

import numpy as np
import torch

from cachegen.codec import _ext, coded, quant, token_classes, transform_frame
from cachegen.codec.bitstream import Frame, FrameHeader, check_identity, parse_frame, read_header
from cachegen.codec.levels import SCHEME_BY_LEVEL
from cachegen.codec.raw import decode_raw
from cachegen.codec.tables import CodecTables, LevelTables
from cachegen.codec.tensors import output_tensor, write_bits, write_values
from cachegen.errors import FormatError, LayoutMismatch
from cachegen.spec import RAW_LEVEL, KVLayout


def decode(
    data: bytes,
    layout: KVLayout,
    model_id: bytes,
    out: torch.Tensor | None = None,
    *,
    tables: CodecTables | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Decode a frame into ``out`` (any device, shape ``layout.shape(num_tokens)``) or a new CPU tensor.

    Levels >= 1 need the ``tables`` the frame was coded with (its tables id is checked). Raises ``FormatError``
    (field, byte offset, value) for any corrupt, truncated or hostile frame, ``UnsupportedVersion`` for another
    format version and ``LayoutMismatch`` for another model, layout or tables. Nothing is allocated before the
    frame's sizes have been checked against its length and ``layout``. ``backend`` ("auto", "cpu",
    "reference") affects runtime only: every backend yields the same values (on the transform-coded levels,
    within the f32 rounding of their sums of products, FORMAT.md §5.5).
    """
    view = memoryview(data).cast("B")
    frame = parse_frame(view)
    check_identity(frame.header, layout, bytes(model_id))
    if frame.header.level == RAW_LEVEL.id:
        bits = decode_raw(view, frame, layout)  # checks the section size before the output is allocated
        return write_bits(output_tensor(layout, frame.header.num_tokens, out), bits)
    use_ext = backend != "reference" and _ext.has_cpu()
    return _decode_coded(view, frame, layout, tables, out, use_ext)


def _decode_coded(
    view: memoryview,
    frame: Frame,
    layout: KVLayout,
    tables: CodecTables | None,
    out: torch.Tensor | None,
    use_ext: bool,
) -> torch.Tensor:
    header = frame.header
    scheme = SCHEME_BY_LEVEL[header.level]
    coded.check_sections(frame, layout, scheme)
    entry = _tables_for(view, frame, tables)
    sizes, words, scales = _payload(view, frame, layout, scheme.is_lossless or scheme.is_transform)
    at = frame.sections[-1].offset
    if scheme.is_transform:
        assert tables is not None  # _tables_for found the level
        classes = transform_frame.read_classes(view, frame, layout) if scheme.token_adaptive else None
        shift = None if classes is None else token_classes.SHIFTS[classes]
        target = output_tensor(layout, header.num_tokens, out)  # shape and dtype checked before the work
        if target.is_cuda and _ext.has_cuda_symbols():  # streams and inverse both on the GPU
            symbols = _symbols_cuda(words, sizes, entry, header.num_tokens, at, shift, target.device)
        else:
            symbols = _symbols(words, sizes, entry, header.num_tokens, use_ext, at, shift)
        args = (symbols, tables, header.level, frame, view, layout, classes, use_ext, target.device)
        return target.copy_(transform_frame.decode_values(*args))  # on a GPU target, its inverse transform there
    shape = (layout.num_layers, 2, layout.num_kv_heads, header.num_tokens, entry.table_map.shape[-1])
    is_16bit_out = layout.dtype == "bfloat16" or scheme.is_lossless  # what the fused kernels write
    fused = () if scales is None else (scales, entry.bins)
    if out is not None and out.is_cuda and out.is_contiguous() and _ext.has_cuda() and is_16bit_out:
        output_tensor(layout, header.num_tokens, out)  # shape and dtype check before the kernel writes
        _raise_for(_ext.decode_cuda(words, sizes, entry, shape, fused, out.view(torch.int16)), at)
        return out
    if use_ext and is_16bit_out:
        bits, status, bad = _ext.decode(words, sizes, entry, shape, fused)
        _raise_status(status, bad, at)
        return write_bits(output_tensor(layout, header.num_tokens, out), bits)
    symbols = coded.decode_symbols(sizes, words, entry, shape)
    target = output_tensor(layout, header.num_tokens, out)
    if scales is None:
        return write_bits(target, quant.join_bytes(symbols))
    coded.check_symbol_range(symbols, entry.bins, at)
    return write_values(target, quant.dequantize(symbols, scales, entry.bins))


def _symbols(
    words: np.ndarray, sizes: np.ndarray, entry: LevelTables, num_tokens: int, use_ext: bool, at: int,
    shift: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """(L, 2, H, T, P) symbols of the frame's streams, each within its level's bins (FORMAT.md §6 rule 7);
    ``shift`` (L, T): the token-adaptive level's table shifts (§5.6; the tables' ladder range keeps them in range)."""
    shape = entry.table_map.shape[:3] + (num_tokens, entry.table_map.shape[-1])
    if use_ext:
        symbols, status, bad = _ext.decode(words, sizes, entry, shape, None, token_shift=shift)
        _raise_status(status, bad, at)
    else:
        symbols = coded.decode_symbols(sizes, words, entry, shape, shift)
    if int(entry.bins.min()) - 1 < entry.tables.freq.shape[1]:  # else no symbol of the alphabet lies above
        coded.check_symbol_range(symbols, entry.bins, at)
    return symbols


def _symbols_cuda(
    words: np.ndarray, sizes: np.ndarray, entry: LevelTables, num_tokens: int, at: int, shift: np.ndarray | None,
    device: torch.device,
) -> torch.Tensor:  # fmt: skip
    """``_symbols`` decoded by the CUDA kernel: uint8 (L, 2, H, T, P) on ``device``; the kernel checks the range."""
    shape = entry.table_map.shape[:3] + (num_tokens, entry.table_map.shape[-1])
    symbols, status = _ext.decode_symbols_cuda(words, sizes, entry, shape, shift, device)
    _raise_for(status, at)
    return symbols


def _tables_for(view: memoryview, frame: Frame, tables: CodecTables | None) -> LevelTables:
    """The caller's tables, if they are the ones the frame names (FORMAT.md §8); else a LayoutMismatch."""
    section = frame.sections[0]
    tables_id = bytes(view[section.offset : section.offset + 16])
    entry = tables.for_level(frame.header.level) if tables is not None and tables.id == tables_id else None
    if entry is None:
        have = tables.id.hex() if tables is not None else "none"
        raise LayoutMismatch(f"frame needs tables {tables_id.hex()} with level {frame.header.level}; have {have}")
    return entry


def _payload(
    view: memoryview, frame: Frame, layout: KVLayout, is_lossless: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Stream sizes, words and (quantized levels) token scales, with the word count checked (FORMAT.md §6.7)."""
    sizes_section, words_section = frame.sections[-2], frame.sections[-1]
    sizes = np.frombuffer(view, "<u4", sizes_section.size // 4, sizes_section.offset).astype(np.uint32)
    if int(sizes.astype(np.int64).sum()) * 4 != words_section.size:
        raise FormatError("stream_sizes", sizes_section.offset, int(sizes.sum()), "word counts != words section")
    words = np.frombuffer(view, "<u4", words_section.size // 4, words_section.offset).astype(np.uint32)
    if is_lossless:
        return sizes, words, None
    section = frame.sections[1]
    scales = np.frombuffer(view, "<u2", section.size // 2, section.offset).astype(np.uint16)
    return sizes, words, scales.reshape(layout.num_layers, 2, frame.header.num_tokens)


def _raise_for(statuses: np.ndarray, at: int) -> None:
    bad = np.flatnonzero(statuses)
    if bad.size:
        _raise_status(int(statuses[bad[0]]), int(bad[0]), at)


def _raise_status(status: int, bad: int, at: int) -> None:
    """Status codes of kernels/include/cachegen/spec.h as the FormatErrors the numpy path raises."""
    if status == 1:
        raise FormatError("rans_final_state", at, bad, f"stream {bad} is corrupt")
    if status == 3:
        raise FormatError("symbol", at, bad, f"stream {bad} has a symbol above bins - 2")
    if status != 0:
        raise FormatError("stream_sizes", at, status, "extension rejected the streams")


def peek_header(data: bytes) -> FrameHeader:
    """The frame's header (level, layout, model id, token range) after its CRC check; payload unchecked."""
    header, _, _ = read_header(memoryview(data).cast("B"))
    return header
