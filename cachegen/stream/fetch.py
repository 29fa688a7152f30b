"""Fetch stored chunks and turn them back into KV tensors; the connector's only way to the store and the codec.

Every failure is a typed ``CacheGenError`` (missing, corrupt, another model, store down): the caller recomputes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from cachegen import codec
from cachegen.errors import CacheGenError
from cachegen.spec import ChunkKey, KVLayout
from cachegen.store import KVStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ChunkCodec:
    """What is needed to code one model's chunks: its layout, fingerprint and the level written on save."""

    layout: KVLayout
    model_id: bytes
    level: int = 0


def fetch_chunk(store: KVStore, key: ChunkKey, chunk_codec: ChunkCodec) -> torch.Tensor:
    """Get and decode one chunk: ``layout.shape(tokens_per_chunk)`` on CPU. Raises CacheGenError subclasses."""
    started = time.perf_counter()
    data = store.get(key)
    kv = codec.decode(data, chunk_codec.layout, chunk_codec.model_id)
    expected = chunk_codec.layout.shape(chunk_codec.layout.tokens_per_chunk)
    if tuple(kv.shape) != expected:
        raise CacheGenError(f"chunk {key.chunk_index} decoded to shape {tuple(kv.shape)}, expected {expected}")
    log.debug(
        "chunk fetched index=%d level=%d bytes=%d ms=%.1f",
        key.chunk_index, key.level, len(data), 1e3 * (time.perf_counter() - started),
    )
    return kv


def store_chunk(store: KVStore, key: ChunkKey, kv: torch.Tensor, chunk_codec: ChunkCodec) -> int:
    """Encode one chunk at the key's level and put it in the store; returns the stored size in bytes."""
    token_start = key.chunk_index * chunk_codec.layout.tokens_per_chunk
    data = codec.encode(kv, chunk_codec.layout, chunk_codec.model_id, level=key.level, token_start=token_start)
    store.put(key, data)
    return len(data)
