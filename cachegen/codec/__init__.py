"""The KV codec: one KV chunk <-> one self-checking frame (FORMAT.md). CPU always; CUDA where built.

Frame API: ``encode``, ``decode``, ``peek_header``; per-model tables: ``calibrate``, ``load_tables``,
``default_tables_path``. Coder-level names (``symbols_of``, ``SCHEME_BY_LEVEL``, ``encode_symbols_cpu``,
``decode_streams_cpu``, ``has_cpu_extension``, ``has_cuda``) serve benchmarks and diagnostics.
"""

from cachegen.codec._ext import decode as decode_streams_cpu
from cachegen.codec._ext import encode_symbols as encode_symbols_cpu
from cachegen.codec._ext import has_cpu as has_cpu_extension
from cachegen.codec._ext import has_cuda
from cachegen.codec.bitstream import FrameHeader
from cachegen.codec.calibrate import calibrate, symbols_of
from cachegen.codec.decode import decode, peek_header
from cachegen.codec.encode import encode
from cachegen.codec.levels import SCHEME_BY_LEVEL
from cachegen.codec.tables import CodecTables, default_tables_path, load_tables

__all__ = [
    "SCHEME_BY_LEVEL",
    "CodecTables",
    "FrameHeader",
    "calibrate",
    "decode",
    "decode_streams_cpu",
    "default_tables_path",
    "encode",
    "encode_symbols_cpu",
    "has_cpu_extension",
    "has_cuda",
    "load_tables",
    "peek_header",
    "symbols_of",
]
