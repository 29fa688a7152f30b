from __future__ import annotations

import pytest

from cachegen.spec import ChunkKey, KVLayout, chain_seed, chunk_keys, prefix_hashes

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16", tokens_per_chunk=32)
MODEL = bytes(range(16))


def test_layout_shape_and_sizes():
    assert LAYOUT.shape(64) == (2, 2, 2, 64, 16)
    assert LAYOUT.values_per_token == 2 * 2 * 2 * 16
    assert LAYOUT.bytes_per_token == 2 * LAYOUT.values_per_token
    with pytest.raises(ValueError):
        KVLayout(2, 2, 16, "int3")


def test_only_full_chunks_get_keys():
    assert len(chunk_keys(list(range(95)), LAYOUT, MODEL, "t")) == 2
    assert len(chunk_keys(list(range(96)), LAYOUT, MODEL, "t")) == 3
    assert chunk_keys(list(range(31)), LAYOUT, MODEL, "t") == []


def test_hash_chain_covers_every_earlier_token():
    tokens = list(range(128))
    base = prefix_hashes(tokens, 32, chain_seed(MODEL, ""))
    late = prefix_hashes(tokens[:70] + [9999] + tokens[71:], 32, chain_seed(MODEL, ""))
    assert late[:2] == base[:2] and all(a != b for a, b in zip(late[2:], base[2:]))
    early = prefix_hashes([9999] + tokens[1:], 32, chain_seed(MODEL, ""))
    assert all(a != b for a, b in zip(early, base))


def test_tenant_and_model_change_every_key():
    tokens = list(range(64))
    base = chunk_keys(tokens, LAYOUT, MODEL, "a")
    assert all(a.prefix_hash != b.prefix_hash for a, b in zip(base, chunk_keys(tokens, LAYOUT, MODEL, "b")))
    other_model = chunk_keys(tokens, LAYOUT, bytes(16), "a")
    assert all(a.prefix_hash != b.prefix_hash for a, b in zip(base, other_model))


def test_keys_are_stable_across_processes():
    # A fixed value: any change to the key derivation breaks every stored cache, so it must be deliberate.
    key = chunk_keys(list(range(32)), LAYOUT, MODEL, "tenant")[0]
    assert key.prefix_hash.hex()[:16] == _EXPECTED_PREFIX


def test_chunk_key_round_trip():
    key = chunk_keys(list(range(64)), LAYOUT, MODEL, "t", level=3)[1]
    assert ChunkKey.from_bytes(key.to_bytes()) == key
    assert key.chunk_index == 1 and key.level == 3
    with pytest.raises(ValueError):
        ChunkKey.from_bytes(key.to_bytes()[:-1])


_EXPECTED_PREFIX = "89fa89673ba6185c"
