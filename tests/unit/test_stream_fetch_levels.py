"""The streamer's store path at every level: a chunk stored by ``store_chunk`` decodes back through ``decode_chunk``.

The transform-coded levels depend on the chunk's position (keys are de-rotated at ``chunk_index *
tokens_per_chunk``); a later chunk must round-trip within its bound as well as the first.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from cachegen.codec import SCHEME_BY_LEVEL, calibrate, quant
from cachegen.spec import LEVELS, ChunkKey, KVLayout
from cachegen.store import open_store
from cachegen.stream.fetch import ChunkCodec, decode_chunk, store_chunk
from tests.unit.codec_fixtures import frame_bound, tiny_transform

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16", tokens_per_chunk=32)
MODEL = b"model-fingerprint"


def make_kv(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(LAYOUT.shape(LAYOUT.tokens_per_chunk), generator=generator).bfloat16()


@pytest.mark.parametrize("chunk_index", [0, 3])
def test_every_level_round_trips_through_the_store(chunk_index: int) -> None:
    samples = [make_kv(1), make_kv(2)]
    tables = calibrate(samples, LAYOUT, MODEL, transform=tiny_transform(samples, LAYOUT))
    chunk_codec = ChunkCodec(LAYOUT, MODEL, tuple(level.id for level in LEVELS), tables)
    store = open_store("memory://")
    kv = make_kv(3)
    key = ChunkKey(MODEL, LAYOUT.digest(), bytes(32), chunk_index, 0)
    assert store_chunk(store, key, kv, chunk_codec) > 0
    values = kv.float().numpy()
    for level in LEVELS:
        back = decode_chunk(store.get(replace(key, level=level.id)), chunk_codec).float().numpy()
        err = np.abs(back - values)
        rounding = np.abs(back) * 2.0**-8 + 1e-5  # the output's own bf16 rounding
        if level.is_lossless:
            assert np.array_equal(back, values), level.name
        elif SCHEME_BY_LEVEL[level.id].is_transform:
            bound = frame_bound(tables, store.get(replace(key, level=level.id)), LAYOUT) * (1 + 1e-4)
            start = 4 if chunk_index == 0 else 0  # the sinks of the context travel raw
            assert np.all((err <= bound + rounding)[:, :, :, start:]), level.name
        else:
            bins = tables.for_level(level.id).bins
            bound = quant.error_bound(quant.token_scales(values), bins)[:, :, None, :, None]
            assert np.all(err <= bound + rounding), level.name
