"""Level 0 "raw": the KV values' own bits, one section (FORMAT.md §5.1)."""

from __future__ import annotations

import numpy as np

from cachegen.codec.bitstream import Frame, dtype_bytes, expect_sections
from cachegen.codec.tensors import BITS_NUMPY
from cachegen.spec import KVLayout

SECTION_RAW = 1


def encode_raw(bits: np.ndarray) -> list[tuple[int, bytes | memoryview]]:
    """Sections of a raw frame: the dtype bits in layout order, little-endian (FORMAT.md §5.1)."""
    little = bits.astype(bits.dtype.newbyteorder("<"), copy=False)
    return [(SECTION_RAW, memoryview(np.ascontiguousarray(little)).cast("B"))]


def decode_raw(data: bytes | memoryview, frame: Frame, layout: KVLayout) -> np.ndarray:
    """The frame's dtype bits as a read-only array of shape ``layout.shape(num_tokens)``; no copy."""
    num_tokens = frame.header.num_tokens
    width = dtype_bytes(layout)
    size = int(np.prod(layout.shape(num_tokens))) * width
    expect_sections(frame, [SECTION_RAW], [size])
    section = frame.sections[0]
    bits = np.frombuffer(data, dtype=BITS_NUMPY[width], count=size // width, offset=section.offset)
    return bits.reshape(layout.shape(num_tokens))
