"""Walking skeleton, end to end: KV out of one vLLM engine, through the store, into a fresh engine.

Engine A and engine B are separate `vllm.entrypoints.openai.api_server` processes sharing only a disk store.
Both run with vLLM's in-memory prefix cache off, so every cached token B reports came through the store.

Greedy text is compared only between runs that compute the same way. A full prefill and "loaded prefix + suffix
prefill" multiply matrices of different shapes, which round differently in bf16 (on AMX hosts more than elsewhere)
and can flip a near-tie token. So B's text is compared with A loading the same stored chunks, and B's first
next-token distribution with A's full prefill, to within rounding: KV injected wrongly moves it by nats.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cachegen import codec
from cachegen.config import Settings
from cachegen.errors import FormatError
from cachegen.model import kv_layout, model_fingerprint
from cachegen.spec import KVLayout, chunk_keys
from cachegen.store import open_store
from tests.integration.engines import EngineServer, start_engine, wait_ready

pytestmark = pytest.mark.engine

CHUNK = 256
QUESTION = "\n\nQuestion: In one sentence, what is the text above about?\nAnswer:"
NO_LOAD = {"kv_transfer_params": {"cachegen": {"load": False}}}
NO_LOAD_NO_SAVE = {"kv_transfer_params": {"cachegen": {"load": False, "save": False}}}
NO_SAVE = {"kv_transfer_params": {"cachegen": {"save": False}}}
TOP = {"logprobs": 5}
ROUNDING_NATS = 0.5
"""Largest first-token logprob change allowed between a full prefill and a load of its exact KV. The logits are
bf16, whose step near 20 is 0.125 (measured on an AMX host: 0.15); wrongly injected KV changes the top-5 itself."""


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    return f"disk://{tmp_path_factory.mktemp('kvstore')}"


@pytest.fixture(scope="module")
def engines(store_url: str, model_dir: Path, tmp_path_factory) -> tuple[EngineServer, EngineServer]:
    settings = Settings.from_env(store={"url": store_url})
    logs = tmp_path_factory.mktemp("engine-logs")
    # Start both at once to overlap their start-ups; B stays fresh: it sees nothing until asked.
    pair = [start_engine(settings, model_dir, logs / f"engine_{name}.log") for name in "ab"]
    try:
        yield tuple(wait_ready(engine) for engine in pair)
    finally:
        for engine in pair:
            engine.stop()


@pytest.fixture(scope="module")
def layout_and_id(model_dir: Path) -> tuple[KVLayout, bytes]:
    layout = kv_layout(model_dir, "bfloat16", CHUNK)
    return layout, model_fingerprint(model_dir, layout)


def _question_ids(tokenizer) -> list[int]:
    return tokenizer(QUESTION, add_special_tokens=False)["input_ids"]


def _wait_stored(store_url: str, keys: list, timeout_s: float = 120) -> None:
    """Saves finish on the engine's saver thread after the response: wait until every chunk is in the store."""
    store = open_store(store_url)
    deadline = time.monotonic() + timeout_s
    while len(store.lookup(keys)) < len(keys):
        assert time.monotonic() < deadline, f"only {len(store.lookup(keys))} of {len(keys)} chunks were stored"
        time.sleep(0.2)


def _text(response: dict) -> tuple[str, int]:
    details = response["usage"].get("prompt_tokens_details") or {}
    return response["choices"][0]["text"], details.get("cached_tokens") or 0


def _assert_same_distribution(full: dict, loaded: dict) -> None:
    """The first generated position's top-5 logprobs of two responses agree to within bf16 rounding."""
    first_full = full["choices"][0]["logprobs"]["top_logprobs"][0]
    first_loaded = loaded["choices"][0]["logprobs"]["top_logprobs"][0]
    shared = first_full.keys() & first_loaded.keys()
    assert len(shared) >= 3, (first_full, first_loaded)
    drift = max(abs(first_full[token] - first_loaded[token]) for token in shared)
    assert drift < ROUNDING_NATS, (first_full, first_loaded)


def test_fresh_engine_reuses_every_stored_chunk(engines, corpus_ids, tokenizer, store_url, layout_and_id):
    engine_a, engine_b = engines
    prompt = corpus_ids[:2000] + _question_ids(tokenizer)
    full = engine_a.complete(prompt, **TOP, **NO_LOAD)
    assert _text(full)[1] == 0
    num_chunks = (len(prompt) - 1) // CHUNK
    keys = chunk_keys(prompt, *layout_and_id, tenant="")[:num_chunks]
    _wait_stored(store_url, keys)

    loaded = engine_b.complete(prompt, **TOP)
    answer, cached_b = _text(loaded)
    assert cached_b == num_chunks * CHUNK
    _assert_same_distribution(full, loaded)
    reference, cached_a = _text(engine_a.complete(prompt, **NO_SAVE))  # A loads the same chunks: same arithmetic
    assert cached_a == num_chunks * CHUNK
    assert answer == reference
    assert len(tokenizer(answer, add_special_tokens=False)["input_ids"]) >= 24  # a real 32-token continuation


def test_prompt_sharing_k_chunks_reuses_exactly_k(engines, corpus_ids, tokenizer, store_url, layout_and_id):
    engine_a, engine_b = engines
    first = corpus_ids[5000:7000] + _question_ids(tokenizer)
    _text(engine_a.complete(first, max_tokens=1))
    _wait_stored(store_url, chunk_keys(first, *layout_and_id, tenant="")[: (len(first) - 1) // CHUNK])

    shared = 3
    second = first[: shared * CHUNK] + corpus_ids[40000:41000] + _question_ids(tokenizer)
    full = engine_a.complete(second, **TOP, **NO_LOAD_NO_SAVE)
    reference, cached_a = _text(engine_a.complete(second, **NO_SAVE))  # the shared chunks, loaded by A
    loaded = engine_b.complete(second, **TOP)
    answer, cached = _text(loaded)
    assert cached == cached_a == shared * CHUNK
    assert answer == reference
    _assert_same_distribution(full, loaded)


def test_other_tenant_reuses_nothing(engines, corpus_ids, tokenizer, store_url, layout_and_id):
    engine_a, engine_b = engines
    prompt = corpus_ids[10000:12000] + _question_ids(tokenizer)
    reference, _ = _text(engine_a.complete(prompt, cache_salt="tenant-a", **NO_LOAD))
    _wait_stored(store_url, chunk_keys(prompt, *layout_and_id, tenant="tenant-a")[: (len(prompt) - 1) // CHUNK])

    answer, cached = _text(engine_b.complete(prompt, cache_salt="tenant-b"))
    assert cached == 0
    assert answer == reference
    _, cached_same_tenant = _text(engine_b.complete(prompt, max_tokens=1, cache_salt="tenant-a"))
    assert cached_same_tenant > 0


def _damage_and_ask(engines, prompt, layout_and_id, store_url, damage) -> None:
    """Store the prompt's chunks through A, damage chunk 2, ask B: the damage is caught and recomputed."""
    engine_a, engine_b = engines
    full = engine_a.complete(prompt, **TOP, **NO_LOAD)
    keys = chunk_keys(prompt, *layout_and_id, tenant="")[: (len(prompt) - 1) // CHUNK]
    _wait_stored(store_url, keys)
    store = open_store(store_url)
    damaged = damage(store.get(keys[2]))
    store.put(keys[2], damaged)
    with pytest.raises(FormatError):
        codec.decode(damaged, *layout_and_id)

    # A meets the same damage first (chunks 0-1 loaded, the rest recomputed): the same arithmetic as B's below
    reference, _ = _text(engine_a.complete(prompt, **NO_SAVE))
    log_before = engine_b.log_path.read_text()
    loaded = engine_b.complete(prompt, **TOP)
    answer, _ = _text(loaded)
    assert answer == reference
    _assert_same_distribution(full, loaded)
    # vLLM fixes prompt_tokens_details when it schedules the request, before the load runs, so the
    # connector's own log is where the failed chunk shows: chunks 0-1 loaded, 2 on recomputed.
    new_log = engine_b.log_path.read_text()[len(log_before) :]
    assert "stream stopped, recomputing the rest: chunk 2 rejected" in new_log
    assert "chunks=2 failed_chunks=5" in new_log
    assert "rescheduled (1280 tokens affected)" in new_log  # vLLM's own word: the 5 chunks are recomputed


def _flip_one_bit(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0x10  # one bit deep inside the KV payload
    return bytes(flipped)


def test_corrupt_chunk_is_detected_and_recomputed(engines, corpus_ids, tokenizer, store_url, layout_and_id):
    prompt = corpus_ids[20000:22000] + _question_ids(tokenizer)
    _damage_and_ask(engines, prompt, layout_and_id, store_url, _flip_one_bit)


def test_truncated_chunk_is_detected_and_recomputed(engines, corpus_ids, tokenizer, store_url, layout_and_id):
    prompt = corpus_ids[25000:27000] + _question_ids(tokenizer)
    _damage_and_ask(engines, prompt, layout_and_id, store_url, lambda data: data[: len(data) // 3])
