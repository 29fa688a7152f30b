"""Turn stored frames back into KV tensors and KV tensors into stored frames, for one model.

Every failure is a typed ``CacheGenError`` (missing, corrupt, another model, store down): callers recompute.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from cachegen import codec
from cachegen.codec import CodecTables
from cachegen.errors import CacheGenError
from cachegen.spec import RAW_LEVEL, ChunkKey, KVLayout
from cachegen.store import KVStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ChunkCodec:
    """What is needed to code one model's chunks."""

    layout: KVLayout
    model_id: bytes
    save_levels: tuple[int, ...] = (RAW_LEVEL.id,)
    """Levels every new chunk is stored at (changes what is stored)."""
    tables: CodecTables | None = None
    """Calibrated tables of this model; coded levels (id >= 1) need them."""


def decode_chunk(data: bytes, chunk_codec: ChunkCodec) -> torch.Tensor:
    """Decode one stored chunk: ``layout.shape(tokens_per_chunk)`` on CPU. Raises CacheGenError subclasses."""
    kv = codec.decode(data, chunk_codec.layout, chunk_codec.model_id, tables=chunk_codec.tables)
    expected = chunk_codec.layout.shape(chunk_codec.layout.tokens_per_chunk)
    if tuple(kv.shape) != expected:
        raise CacheGenError(f"chunk decoded to shape {tuple(kv.shape)}, expected {expected}")
    return kv


def store_chunk(store: KVStore, key: ChunkKey, kv: torch.Tensor, chunk_codec: ChunkCodec) -> int:
    """Encode one chunk at every save level and put each in the store; returns the bytes stored."""
    token_start = key.chunk_index * chunk_codec.layout.tokens_per_chunk
    total = 0
    for level in chunk_codec.save_levels:
        data = codec.encode(kv, chunk_codec.layout, chunk_codec.model_id, level=level, token_start=token_start,
                            tables=chunk_codec.tables)  # fmt: skip
        store.put(ChunkKey(key.model_id, key.layout_digest, key.prefix_hash, key.chunk_index, level), data)
        total += len(data)
    return total
