"""Our rANS streams and constriction's AnsCoder agree word for word, both directions (FORMAT.md §7)."""

from __future__ import annotations

import constriction
import numpy as np
import pytest

from cachegen.codec.rans import TOTAL, Tables, decode_streams, encode_streams
from cachegen.errors import FormatError


def random_tables(rng: np.random.Generator, num_tables: int, alphabet: int) -> Tables:
    weights = rng.random((num_tables, alphabet)) ** 4  # skewed, like real quantized KV
    freq = 1 + np.floor(weights / weights.sum(1, keepdims=True) * (TOTAL - alphabet)).astype(np.int64)
    freq[:, 0] += TOTAL - freq.sum(1)
    return Tables(freq.astype(np.uint32))


def sample(rng: np.random.Generator, tables: Tables, table_ids: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(tables.freq, axis=1)[table_ids]
    return (cdf <= rng.integers(0, TOTAL, table_ids.shape)[..., None]).sum(-1).astype(np.int32)


def constriction_encode(symbols: np.ndarray, table_ids: np.ndarray, tables: Tables) -> np.ndarray:
    coder = constriction.stream.stack.AnsCoder()
    for j in range(symbols.size - 1, -1, -1):
        # freq - 1 with perfect=False makes constriction use exactly our integer table (DESIGN §4).
        model = constriction.stream.model.Categorical(tables.freq[table_ids[j]] - 1.0, perfect=False)
        coder.encode_reverse(np.array([symbols[j]], np.int32), model)
    return coder.get_compressed()


def constriction_decode(words: np.ndarray, table_ids: np.ndarray, tables: Tables) -> np.ndarray:
    coder = constriction.stream.stack.AnsCoder(words.astype(np.uint32))
    out = [coder.decode(constriction.stream.model.Categorical(tables.freq[t] - 1.0, perfect=False)) for t in table_ids]
    assert coder.is_empty()
    return np.array(out, np.int32)


@pytest.mark.parametrize("seed", range(6))
def test_streams_match_constriction_word_for_word(seed: int) -> None:
    rng = np.random.default_rng(seed)
    tables = random_tables(rng, int(rng.integers(1, 4)), int(rng.integers(2, 40)))
    num_streams, length = int(rng.integers(1, 5)), int(rng.integers(1, 200))
    table_ids = rng.integers(0, tables.freq.shape[0], (num_streams, length))
    symbols = sample(rng, tables, table_ids)
    words, num_words = encode_streams(symbols, table_ids, tables)
    ends = np.cumsum(num_words.astype(np.int64))
    for stream in range(num_streams):
        ours = words[ends[stream] - num_words[stream] : ends[stream]]
        theirs = constriction_encode(symbols[stream], table_ids[stream], tables)
        assert np.array_equal(ours, theirs)
        assert np.array_equal(constriction_decode(ours, table_ids[stream], tables), symbols[stream])
    assert np.array_equal(decode_streams(words, num_words, table_ids, tables), symbols)


def test_zero_state_stream_is_empty() -> None:
    tables = Tables(np.array([[TOTAL - 1, 1]], np.uint32))
    words, num_words = encode_streams(np.zeros((1, 3), np.int32), np.zeros((1, 3), np.int64), tables)
    assert words.size == 0 and num_words.tolist() == [0]
    assert decode_streams(words, num_words, np.zeros((1, 3), np.int64), tables).tolist() == [[0, 0, 0]]


def test_corrupt_stream_fails_final_state_check() -> None:
    rng = np.random.default_rng(7)
    tables = random_tables(rng, 1, 16)
    table_ids = np.zeros((1, 500), np.int64)
    words, num_words = encode_streams(sample(rng, tables, table_ids), table_ids, tables)
    words[len(words) // 2] ^= 1 << 5
    with pytest.raises(FormatError) as info:
        decode_streams(words, num_words, table_ids, tables)
    assert info.value.field == "rans_final_state"


def test_tables_reject_bad_rows() -> None:
    with pytest.raises(ValueError):
        Tables(np.array([[TOTAL, 0]], np.uint32))
    with pytest.raises(ValueError):
        Tables(np.array([[5, 5]], np.uint32))
