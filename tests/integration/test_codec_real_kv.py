"""Real SmolLM2 KV (64 tokens of CPython's pydoc text): our streams equal constriction's, word for word.

The bundled model comes from the installed package (prepared once by the session fixture); nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest

from cachegen.codec import calibrate
from cachegen.codec.calibrate import symbols_of
from cachegen.codec.coded import encode_symbols
from cachegen.model import kv_layout


def constriction_words(symbols: np.ndarray, ids: np.ndarray, freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """constriction's words for the stream and its decode of them, one table row per symbol (freq - 1)."""
    import constriction

    family = constriction.stream.model.Categorical(perfect=False)
    probs = (freq[ids] - 1).astype(np.float32)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(symbols.astype(np.int32), family, probs)
    words = coder.get_compressed()
    return words, constriction.stream.stack.AnsCoder(words).decode(family, probs)


@pytest.fixture(scope="module")
def real_kv(model_dir):
    from pydoc_data import topics

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cachegen.codec.calibrate_cli import collect_kv

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    kv, _ = collect_kv(model, tokenizer, topics.topics["assert"], 64)
    layout = kv_layout(model_dir, "bfloat16", 64)
    return kv, layout, calibrate([kv], layout, b"real")


@pytest.mark.parametrize("level", [1, 3, 5])
def test_real_kv_streams_match_constriction(real_kv, level: int) -> None:
    kv_tensor, layout, tables = real_kv
    entry = tables.for_level(level)
    symbols, _ = symbols_of(kv_tensor, entry.quant_bins)
    sizes, words = encode_symbols(symbols, entry)
    ends = np.cumsum(sizes.astype(np.int64))
    per_token = symbols.shape[-1]
    for group, (layer, kv, head) in enumerate([(0, 0, 0), (1, 0, 2), (7, 1, 1)]):
        stream = ((layer * 2 + kv) * layout.num_kv_heads + head) * 2  # first of the group's two blocks
        ours = words[ends[stream] - sizes[stream] : ends[stream]]
        block = symbols[layer, kv, head, :32].reshape(-1)
        ids = np.tile(entry.table_map[layer, kv, head], 32)
        theirs, decoded = constriction_words(block, ids, entry.tables.freq)
        assert np.array_equal(ours, theirs), group
        assert np.array_equal(decoded, block)
        assert per_token * 32 == block.size
