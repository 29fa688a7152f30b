"""Transform-coded levels on real SmolLM2 KV: fitted with the model, within their bound, faithful, constriction-exact.

Small on purpose (256-token samples, a 256-token probe): the figures of merit live in `cachegen bench codec`;
this checks that the fit, the frames and the model agree end to end.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cachegen.codec import calibrate, decode, encode
from cachegen.codec.calibrate import level_symbols
from cachegen.codec.coded import encode_symbols, table_ids
from cachegen.model import kv_layout
from cachegen.spec import LEVEL_BY_NAME
from tests.integration.test_codec_real_kv import constriction_words
from tests.unit.codec_fixtures import frame_bound

MODEL = b"real"


@pytest.fixture(scope="module")
def fitted(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cachegen.codec.calibrate_cli import calibration_texts, collect_kv
    from cachegen.codec.transform_fit import collect, fit_transform

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    texts = calibration_texts(4)
    layout = kv_layout(model_dir, "bfloat16", 256)
    samples = [collect(model, tokenizer(text, return_tensors="pt").input_ids[0, :256]) for text in texts[:2]]
    kv, ids = collect_kv(model, tokenizer, texts[1][5000:], 256 + 32)
    transform = fit_transform(model, samples, layout, (kv[:, :, :, :256].contiguous(), ids[256:]))
    tables = calibrate([kv for kv, _ in samples], layout, MODEL, None, transform)
    evaluated = collect_kv(model, tokenizer, texts[3], 256 + 64)  # pydoc: text the fit never saw
    return model, layout, tables, evaluated


@pytest.mark.parametrize("name", ["pca3", "pca2", "pca2t", "pca2x"])
def test_real_kv_round_trip_is_bounded_and_faithful(fitted, name: str) -> None:
    from cachegen.codec.sensitivity import mean_kl, next_token_logits

    model, layout, tables, (kv, ids) = fitted
    level = LEVEL_BY_NAME[name].id
    context, continuation = kv[:, :, :, :256].contiguous(), ids[256:]
    frame = encode(context, layout, MODEL, level, 0, tables=tables)
    back = decode(frame, layout, MODEL, tables=tables)
    bound = torch.from_numpy(np.ascontiguousarray(frame_bound(tables, frame, layout))).float()
    err = (back.float() - context.float()).abs()
    assert torch.equal(back[:, :, :, :4], context[:, :, :, :4])  # attention sinks travel raw
    assert torch.all((err <= bound * (1 + 1e-4) + back.float().abs() * 2.0**-8 + 1e-5)[:, :, :, 4:])
    bits_per_value = len(frame) * 8 / context.numel()
    assert bits_per_value < 6.0  # raw bf16 is 16; q8 codes this model's KV at ~6.6
    kl = mean_kl(next_token_logits(model, context, continuation), next_token_logits(model, back, continuation))
    assert kl < 0.05  # CacheGen's own default level measures ~0.04 at 2K tokens; these levels 0.004-0.012


@pytest.mark.parametrize("name", ["pca2", "pca2t", "pca2x"])
def test_real_kv_transform_streams_match_constriction(fitted, name: str) -> None:
    """Our words equal constriction's; on pca2t each token's symbols use its class's ladder rows."""
    _, layout, tables, (kv, _) = fitted
    level = LEVEL_BY_NAME[name].id
    entry = tables.for_level(level)
    symbols, shift = level_symbols(kv[:, :, :, :64].contiguous(), level, entry.quant_bins, tables.transform)
    ids = table_ids(entry.table_map, shift, symbols.shape)
    sizes, words = encode_symbols(symbols, entry, shift)
    ends = np.cumsum(sizes.astype(np.int64))
    for layer, kind, head in [(0, 0, 0), (13, 1, 2), (29, 0, 1)]:
        stream = ((layer * 2 + kind) * layout.num_kv_heads + head) * 2  # first of the group's two blocks
        block = symbols[layer, kind, head, :32].reshape(-1)
        theirs, decoded = constriction_words(block, ids[layer, kind, head, :32].reshape(-1), entry.tables.freq)
        assert np.array_equal(words[ends[stream] - sizes[stream] : ends[stream]], theirs)
        assert np.array_equal(decoded, block)
