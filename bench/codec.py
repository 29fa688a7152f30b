"""`cachegen bench codec`: size, fidelity and throughput per codec level on real text through the real model.

Per level: bits_per_value, ratio_vs_bf16, ratio_vs_int8 (CacheGen's 256-bin level "q8"), entropy_overhead (coded
words / ideal code length of the symbols under the tables - 1), encode/decode Msym/s on one core for the C++
extension and for constriction on the same streams, and teacher-forced fidelity against exact KV over a real
continuation: top1_agreement, kl, ppl_delta; plus 7-digit needle-in-a-haystack accuracy. A zstd row is the
general-purpose baseline. Heavy imports stay inside `run`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=2048, help="context tokens per document")
    parser.add_argument("--continuation", type=int, default=256, help="teacher-forced reference tokens")
    parser.add_argument("--documents", type=int, default=2, help="evaluation documents (essays, pydoc)")
    parser.add_argument("--niah-tokens", type=int, default=4096, help="haystack length; 0 skips NIAH")
    parser.add_argument("--niah-trials", type=int, default=3)
    parser.add_argument("--levels", default="", help="comma-separated level names (default: all)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda adds GPU decode GB/s")
    parser.add_argument("--model", default="", help="local HF model dir (default: bundled SmolLM2-135M)")
    parser.add_argument("--json", default="", help="write the full result here (and a .png plot beside it)")


def _git_sha() -> str:
    try:
        git = ["git", "rev-parse", "--short", "HEAD"]
        return subprocess.run(git, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "unknown"


def _fidelity(exact, decoded, targets) -> dict[str, float]:
    """Teacher-forced agreement of next-token distributions; ``targets[i]`` is the token logits[i] predicts."""
    import torch

    log_exact, log_dec = torch.log_softmax(exact, -1), torch.log_softmax(decoded, -1)
    kl = (log_exact.exp() * (log_exact - log_dec)).sum(-1).mean().item()
    nll_exact = -log_exact.gather(1, targets[:, None]).mean().item()
    nll_dec = -log_dec.gather(1, targets[:, None]).mean().item()
    top1 = (exact.argmax(-1) == decoded.argmax(-1)).float().mean().item()
    return {"top1_agreement": top1, "kl": kl, "ppl_delta": float(torch.tensor(nll_dec - nll_exact).exp() - 1)}


def _chunks(kv, layout):
    step = layout.tokens_per_chunk
    return [(start, kv[:, :, :, start : start + step].contiguous()) for start in range(0, kv.shape[3], step)]


def _code(kv, layout, model_id, level, tables):
    """Encode chunk by chunk and decode back: (decoded kv, total bytes, encode s, decode s)."""
    import torch

    from cachegen.codec import decode, encode

    frames, encode_s = [], 0.0
    for start, chunk in _chunks(kv, layout):
        began = time.perf_counter()
        frames.append(encode(chunk, layout, model_id, level, start, tables=tables))
        encode_s += time.perf_counter() - began
    began = time.perf_counter()
    parts = [decode(frame, layout, model_id, tables=tables) for frame in frames]
    decode_s = time.perf_counter() - began
    return torch.cat(parts, dim=3), sum(map(len, frames)), encode_s, decode_s


def _coder_stats(kv, layout, level, tables) -> dict[str, float]:
    """Entropy overhead and one-core Msym/s of the extension and of constriction on one chunk's streams."""
    import constriction
    import numpy as np

    from cachegen.codec import coded, decode_streams_cpu, encode_symbols_cpu
    from cachegen.codec.calibrate import level_symbols

    entry = tables.for_level(level)
    symbols, shift = level_symbols(_chunks(kv, layout)[0][1], level, entry.quant_bins, tables.transform)
    ids = coded.table_ids(entry.table_map, shift, symbols.shape)
    ideal_bits = -np.log2(entry.tables.freq[ids, symbols] / 2.0**24).sum()
    began = time.perf_counter()
    sizes, words = encode_symbols_cpu(symbols, entry, token_shift=shift)
    encode_s = time.perf_counter() - began
    began = time.perf_counter()
    decode_streams_cpu(words, sizes, entry, symbols.shape, None, token_shift=shift)
    decode_s = time.perf_counter() - began
    # constriction on the first head's first stream block (it needs per-symbol tables: freq - 1, perfect=False)
    n = min(symbols.shape[3], 32) * symbols.shape[4]
    probs = (entry.tables.freq[ids[0, 0, 0].reshape(-1)[:n]] - 1).astype(np.float32)
    family = constriction.stream.model.Categorical(perfect=False)
    coder = constriction.stream.stack.AnsCoder()
    began = time.perf_counter()
    coder.encode_reverse(symbols[0, 0, 0].reshape(-1)[:n].astype(np.int32), family, probs)
    c_encode_s = time.perf_counter() - began
    began = time.perf_counter()
    constriction.stream.stack.AnsCoder(coder.get_compressed()).decode(family, probs)
    c_decode_s = time.perf_counter() - began
    count = symbols.size
    identical = bool(np.array_equal(coder.get_compressed(), words[: int(sizes[0])])) if n == 32 * ids.shape[4] else None
    return {
        "constriction_identical_words": identical,
        "entropy_overhead": float(words.size * 32 / ideal_bits - 1),
        "encode_msym_s": count / encode_s / 1e6, "decode_msym_s": count / decode_s / 1e6,
        "constriction_encode_msym_s": n / c_encode_s / 1e6, "constriction_decode_msym_s": n / c_decode_s / 1e6,
    }  # fmt: skip


def _chat_ids(tokenizer, question: str):
    """The instruct model's chat prompt for ``question``, with the answer's first words already given."""
    import torch

    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    answer = tokenizer("The special magic number is", add_special_tokens=False).input_ids
    return torch.tensor(list(ids) + list(answer))


def _niah(ctx, level: int | None, args: argparse.Namespace, haystack: str) -> float:
    """Share of trials where greedy generation after the (coded) haystack KV returns the 7-digit needle."""
    import torch

    from cachegen.codec.sensitivity import cache_of

    model, tokenizer, layout, model_id, tables, _ = ctx
    hits = 0
    for trial in range(args.niah_trials):
        needle = str(random.Random(trial).randint(1_000_000, 9_999_999))
        # cut the haystack to the token budget first, so the needle always lies inside the context
        words = tokenizer.decode(tokenizer(haystack).input_ids[: args.niah_tokens - 48]).split(" ")
        depth = len(words) * (trial + 1) // (args.niah_trials + 1)
        text = " ".join(words[:depth] + [f"The special magic number is {needle}."] + words[depth:])
        ids = _chat_ids(tokenizer, text + "\n\nWhat is the special magic number mentioned in the text above?")
        with torch.no_grad():
            cache = model(ids[None, :-1], use_cache=True).past_key_values
        kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]).contiguous()
        if level is not None:
            kv = _code(kv, layout, model_id, level, tables)[0]
        out = model.generate(ids[None], past_key_values=cache_of(kv), max_new_tokens=10, do_sample=False)
        hits += needle in tokenizer.decode(out[0, ids.numel() :])
    return hits / args.niah_trials


def _setup(args: argparse.Namespace):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cachegen.codec import calibrate
    from cachegen.codec.calibrate_cli import (
        CALIBRATION_TOKENS,
        SENSITIVITY_TOKENS,
        calibration_texts,
        collect_kv,
        fit_for_model,
    )
    from cachegen.config import Settings
    from cachegen.model import ensure_model, kv_layout, model_fingerprint

    torch.manual_seed(0)
    model_dir = ensure_model(Settings.from_env().home, args.model)
    positions = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings", 0)
    if positions and args.tokens + args.continuation > positions:
        # the context and its continuation must fit the model's positions: the context gives way
        log.warning("context cut tokens=%d to=%d positions=%d", args.tokens, positions - args.continuation, positions)
        args.tokens = positions - args.continuation
    layout = kv_layout(model_dir, "bfloat16", Settings.from_env().codec.tokens_per_chunk)
    model_id = model_fingerprint(model_dir, layout)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    texts = calibration_texts(4)
    # Calibrate on the tail of each text, evaluate on the head: tables never see the evaluated tokens.
    tails = [text[len(text) // 2 :] for text in (texts[1], texts[0], texts[2])]
    samples, sensitivity, transform = fit_for_model(model, tokenizer, tails, layout, CALIBRATION_TOKENS,
                                                    SENSITIVITY_TOKENS)  # fmt: skip
    tables = calibrate(samples, layout, model_id, sensitivity, transform)
    docs = []
    for text in [texts[0], texts[3], texts[1]][: args.documents]:
        kv, ids = collect_kv(model, tokenizer, text, args.tokens + args.continuation)
        if len(tokenizer.decode(ids)) > len(text) // 2:  # the context would reach the text the tables saw
            raise SystemExit(f"--tokens {args.tokens} reaches the calibration half of a {len(text)}-char text")
        docs.append((kv[:, :, :, : args.tokens].contiguous(), ids))
    return model, tokenizer, layout, model_id, tables, docs


def _level_row(level, ctx, args) -> dict:
    import numpy as np

    from cachegen.codec.sensitivity import next_token_logits

    model, _, layout, model_id, tables, docs = ctx
    metrics, size_bytes, values, encode_s, decode_s = [], 0, 0, 0.0, 0.0
    for kv, ids in docs:
        cont = ids[args.tokens :]
        exact = next_token_logits(model, kv, cont)
        decoded, size, enc, dec = _code(kv, layout, model_id, level.id, tables)
        metrics.append(_fidelity(exact[:-1], next_token_logits(model, decoded, cont)[:-1], cont[1:]))
        size_bytes, values, encode_s, decode_s = size_bytes + size, values + kv.numel(), encode_s + enc, decode_s + dec
    row = {"level": level.name, "id": level.id, "bits_per_value": size_bytes * 8 / values}
    row.update({key: float(np.mean([m[key] for m in metrics])) for key in metrics[0]})
    row.update({"frame_encode_msym_s": values / encode_s / 1e6, "frame_decode_msym_s": values / decode_s / 1e6})
    if level.id >= 1:
        row.update(_coder_stats(docs[0][0], layout, level.id, tables))
    if args.device == "cuda":
        row["gpu_decode_gb_s"] = _gpu_decode_gb_s(docs[0][0], layout, model_id, level.id, tables)
    log.info(
        "level done name=%s bits_per_value=%.3f top1=%.4f", level.name, row["bits_per_value"], row["top1_agreement"]
    )
    return row


def _gpu_decode_gb_s(kv, layout, model_id, level: int, tables) -> float | None:
    """bf16 GB/s written by decoding one chunk straight into a CUDA tensor (host parsing included)."""
    import torch

    from cachegen.codec import decode, encode, has_cuda

    if not has_cuda():
        return None
    chunk = _chunks(kv, layout)[0][1]
    frame = encode(chunk, layout, model_id, level, tables=tables)
    out = torch.empty(chunk.shape, dtype=chunk.dtype, device="cuda")
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        began = time.perf_counter()
        decode(frame, layout, model_id, out=out, tables=tables)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - began)
    return chunk.numel() * 2 / best / 1e9


def _zstd_row(docs) -> dict:
    import zstandard

    raw = b"".join(kv.view(__import__("torch").int16).numpy().tobytes() for kv, _ in docs)
    began = time.perf_counter()
    packed = zstandard.ZstdCompressor(level=3).compress(raw)
    encode_s = time.perf_counter() - began
    return {"level": "zstd-3 (bf16 bytes)", "bits_per_value": len(packed) * 8 / (len(raw) / 2),
            "top1_agreement": 1.0, "kl": 0.0, "ppl_delta": 0.0, "frame_encode_msym_s": len(raw) / 2 / encode_s / 1e6}  # fmt: skip


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for row in rows:
        axis.scatter(row["bits_per_value"], row["top1_agreement"])
        axis.annotate(row["level"], (row["bits_per_value"], row["top1_agreement"]), fontsize=8)
    axis.axhline(0.98, linestyle="--", linewidth=0.8)
    axis.axvline(2.0, linestyle="--", linewidth=0.8)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("bits per KV value (log2)")
    axis.set_ylabel("teacher-forced top-1 agreement")
    figure.tight_layout()
    figure.savefig(path)


def run(args: argparse.Namespace) -> int:
    import torch

    from cachegen import obs
    from cachegen.config import Settings
    from cachegen.spec import LEVELS

    obs.configure_logging(Settings.from_env().log)  # calibration and each level's row take minutes: say so
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ctx = _setup(args)
    wanted = set(args.levels.split(",")) if args.levels else {level.name for level in LEVELS}
    rows = [_level_row(level, ctx, args) for level in LEVELS if level.name in wanted]
    q8 = next((row["bits_per_value"] for row in rows if row["level"] == "q8"), None)
    for row in rows:
        row["ratio_vs_bf16"] = 16 / row["bits_per_value"]
        row["ratio_vs_int8"] = q8 / row["bits_per_value"] if q8 else None
    if args.niah_tokens:
        essays = __import__("cachegen.codec.calibrate_cli", fromlist=["x"]).calibration_texts(3)[2] * 3
        exact = _niah(ctx, None, args, essays)
        for row in rows:
            row["niah_accuracy"] = _niah(ctx, row["id"], args, essays)
            row["niah_accuracy_exact"] = exact
    rows.append(_zstd_row(ctx[5]))
    settings = {key: value for key, value in vars(args).items() if key not in ("json", "func")}
    settings.pop("bench_module", None)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    result = {"git_sha": _git_sha(), "device": device, "tokens": args.tokens, "continuation": args.continuation, "rows": rows,
              "settings_digest": hashlib.blake2b(json.dumps(settings, sort_keys=True, default=str).encode(),
                                                 digest_size=8).hexdigest()}  # fmt: skip
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        _plot([row for row in rows if "top1_agreement" in row], Path(args.json).with_suffix(".png"))
    return 0
