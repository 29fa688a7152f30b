from __future__ import annotations

from cachegen.connector.plan import (
    RequestState,
    chunk_block_ids,
    load_spans,
    num_complete_chunks,
    num_loadable_chunks,
    save_spans,
)
from cachegen.spec import KVLayout, chunk_keys

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16", tokens_per_chunk=32)


def _state(num_tokens: int, block_size: int = 16) -> RequestState:
    keys = chunk_keys(list(range(num_tokens)), LAYOUT, bytes(16), "")
    num_blocks = -(-num_tokens // block_size)
    return RequestState(keys=keys, block_ids=list(range(100, 100 + num_blocks)))


def test_last_prompt_token_is_never_loaded():
    assert num_loadable_chunks(64, 32) == 1  # 64 tokens: the 2nd chunk holds the last token
    assert num_loadable_chunks(65, 32) == 2
    assert num_loadable_chunks(0, 32) == 0


def test_complete_chunks_count_only_prompt_tokens():
    assert num_complete_chunks(200, 70, 32) == 2
    assert num_complete_chunks(63, 100, 32) == 1


def test_chunk_blocks():
    assert chunk_block_ids([7, 8, 9, 10], 1, 2) == (9, 10)


def test_load_skips_what_the_engine_prefix_cache_holds():
    state = _state(128)
    hits = [{0: 4096}, {0: 4096, 3: 900}, {0: 4096}]
    spans = load_spans(state, hits, num_local_tokens=48, tokens_per_chunk=32, blocks_per_chunk=2)
    assert [s.index for s in spans] == [1, 2]
    assert spans[0].first_token == 16 and spans[1].first_token == 0
    assert spans[0].block_ids == (102, 103) and spans[0].key == state.keys[1]
    assert spans[0].levels == ((0, 4096), (3, 900))


def test_saves_each_chunk_once_as_prefill_advances():
    state = _state(100)
    first = save_spans(state, 40, 100, 32, 2)
    assert [s.index for s in first] == [0]
    second = save_spans(state, 100, 100, 32, 2)
    assert [s.index for s in second] == [1, 2]
    assert save_spans(state, 101, 100, 32, 2) == ()  # decode steps add nothing


def test_chunks_found_in_the_store_are_not_saved_again():
    state = _state(100)
    state.num_stored_chunks = 2
    assert [s.index for s in save_spans(state, 100, 100, 32, 2)] == [2]


def test_save_can_be_switched_off_per_request():
    state = _state(100)
    state.is_save_enabled = False
    assert save_spans(state, 100, 100, 32, 2) == ()
