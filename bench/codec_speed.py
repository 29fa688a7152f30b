"""`cachegen bench codec-speed`: one-core decode Msym/s of the C++ extension per coded level, nothing else.

Tables come from `cachegen.codec.calibrate` on real SmolLM2 KV (calibrated on essay tails with measured
sensitivity and the model's transform, timed on a pydoc chunk the tables never saw), cached under `--cache` so
reruns skip the model; with `--synthetic`, or when the model cannot be prepared, seeded Laplacian-like KV instead,
which has no transform-coded levels (the JSON says which). Per level and mode, the median of `--repeats` timed
calls on one thread:
- "symbols": rANS decode to int32 symbols; "fused" (quantized and lossless levels): to the 16-bit output the frame
  decoder writes. `--baseline PATH` loads an earlier build of the extension (a saved `_cpu*.so`) and times it in
  the same process, interleaved repeat by repeat with the current one, so machine noise hits both alike; its
  outputs must equal the current build's bit for bit. On a CPU with the AVX-512 decode path, the same build's
  portable lanes (`simd=False`) are timed the same way, for `simd_speedup`.
- "inverse" (transform levels): their step after the streams, symbols to bf16 KV, the extension's against
  torch's (`torch_speedup`; the two agree within f32 rounding, `share_identical` says how many bit for bit);
  for level 9 (pca2x), whose prediction down the layers only torch runs, torch's alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import statistics
import time
from pathlib import Path

from bench.common import device_name, emit, git_sha

log = logging.getLogger(__name__)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=256, help="tokens of KV decoded per timing (one chunk)")
    parser.add_argument("--repeats", type=int, default=15, help="timed decodes per level and mode (median)")
    parser.add_argument("--levels", default="", help="comma-separated level names (default: every coded level)")
    parser.add_argument("--baseline", default="", help="an earlier build's _cpu*.so to time side by side")
    parser.add_argument("--cache", default="build/codec_speed", help="where real KV and its tables are cached")
    parser.add_argument("--synthetic", action="store_true", help="seeded synthetic KV instead of the model's")
    parser.add_argument("--json", default="", help="write the result here")


def _real_kv(args: argparse.Namespace):
    """(tables, kv) from the model, cached as a tables file and a safetensors file under --cache."""
    import dataclasses
    import json

    from safetensors.torch import load_file, save_file

    from cachegen.codec import load_tables

    cache = Path(args.cache)
    # "tables_transform": tables of earlier runs (no transform levels) are not reused
    kv_path, tables_path = cache / f"kv_{args.tokens}.safetensors", cache / "tables_transform.cgct"
    if not (kv_path.exists() and tables_path.exists()):
        layout, tables, kv = _from_model(args.tokens)
        cache.mkdir(parents=True, exist_ok=True)
        tables.save(tables_path)
        save_file({"kv": kv}, kv_path, metadata={"layout": json.dumps(dataclasses.asdict(layout))})
    return load_tables(tables_path.read_bytes()), load_file(kv_path)["kv"]


def _from_model(num_tokens: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cachegen.codec import calibrate
    from cachegen.codec.calibrate_cli import calibration_texts, collect_kv, fit_for_model
    from cachegen.config import Settings
    from cachegen.model import ensure_model, kv_layout, model_fingerprint

    settings = Settings.from_env()
    model_dir = ensure_model(settings.home, "")
    layout = kv_layout(model_dir, "bfloat16", settings.codec.tokens_per_chunk)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    texts = calibration_texts(4)
    tails = [text[len(text) // 2 :] for text in (texts[1], texts[0])]
    samples, sensitivity, transform = fit_for_model(model, tokenizer, tails, layout, 1024, 512)
    tables = calibrate(samples, layout, model_fingerprint(model_dir, layout), sensitivity, transform)
    return layout, tables, collect_kv(model, tokenizer, texts[3], num_tokens)[0].contiguous()


def _synthetic_kv(num_tokens: int):
    """SmolLM2-135M's shape; per-channel Laplacian values with a few outlier channels, as real keys have."""
    import torch

    from cachegen.codec import calibrate
    from cachegen.spec import KVLayout

    layout = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype="bfloat16", tokens_per_chunk=256)
    gen = torch.Generator().manual_seed(0)
    channel_scale = torch.rand((layout.num_layers, 2, layout.num_kv_heads, 1, layout.head_dim), generator=gen)
    channel_scale = 0.2 + 4 * channel_scale**4

    def sample(tokens: int):
        uniform = torch.rand(layout.shape(tokens), generator=gen).clamp(1e-7, 1 - 1e-7)
        laplace = -torch.sign(uniform - 0.5) * torch.log1p(-2 * (uniform - 0.5).abs())
        return (laplace * channel_scale).bfloat16().contiguous()

    return calibrate([sample(1024), sample(1024)], layout, b"synthetic"), sample(num_tokens)


def _load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("_cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _baseline_decode(module, words, sizes, entry, shape, fused):
    """decode() of another build: with the bounds argument (097779d on), or without it (the old signature)."""
    import numpy as np

    from cachegen.codec import _ext

    args, table_map, freq, cum = _ext._desc(entry, shape)
    dim = shape[4] if fused or fused is None else shape[4] // 2
    out = np.empty(shape[:4] + (dim,), np.int32 if fused is None else np.uint16)
    scales, bins = (np.ascontiguousarray(f, "<u2") for f in fused) if fused else (None, None)
    rest = (words, sizes, scales, bins, out, 0 if fused is None else 1, 1)
    try:
        status, _ = module.decode(args, table_map, freq, cum, entry.slots, entry.bounds, *rest)
    except TypeError:  # a build before 097779d: no bounds argument
        status, _ = module.decode(args, table_map, freq, cum, entry.slots, *rest)
    return out, status


def _time_level(entry, tables, kv, args, baseline) -> list[dict]:
    import numpy as np

    from cachegen.codec import _ext, encode_symbols_cpu, symbols_of
    from cachegen.codec.calibrate import level_symbols
    from cachegen.codec.levels import SCHEME_BY_LEVEL

    is_transform = SCHEME_BY_LEVEL[entry.level].is_transform
    if is_transform:
        (symbols, shift), scales = level_symbols(kv, entry.level, entry.quant_bins, tables.transform), None
    else:
        (symbols, scales), shift = symbols_of(kv, entry.quant_bins), None
    sizes, words = encode_symbols_cpu(symbols, entry, token_shift=shift)
    modes = [("symbols", None)] + ([] if is_transform else [("fused", () if scales is None else (scales, entry.bins))])
    rows = []
    for mode, fused in modes:
        runs = {"new": lambda fused=fused: _ext.decode(words, sizes, entry, symbols.shape, fused, 1, shift)[:2]}
        if _ext.has_simd_decode():  # the same build's portable lanes, for the vector path's speedup
            runs["portable"] = lambda fused=fused: _ext.decode(
                words, sizes, entry, symbols.shape, fused, 1, shift, simd=False
            )[:2]
        if baseline is not None and shift is None:  # _baseline_decode passes no token shifts
            runs["old"] = lambda fused=fused: _baseline_decode(baseline, words, sizes, entry, symbols.shape, fused)
        outputs = {name: fn() for name, fn in runs.items()}  # warm-up, and the outputs to compare
        assert all(status == 0 for _, status in outputs.values())
        row = {"mode": mode, "msym": symbols.size / 1e6, "bits_per_symbol": words.size * 32 / symbols.size}
        row.update(_rates(runs, args.repeats, symbols.size))
        if "portable" in runs:
            row["portable_identical"] = bool(np.array_equal(outputs["portable"][0], outputs["new"][0]))
            row["simd_speedup"] = row["new_msym_s"] / row["portable_msym_s"]
        if "old" in runs:
            row["identical"] = bool(np.array_equal(outputs["old"][0], outputs["new"][0]))
            row["speedup"] = row["new_msym_s"] / row["old_msym_s"]
        rows.append(row)
    if is_transform and entry.level in tables.transform.cross_layer:
        rows.append(_chain_row(entry.level, tables.transform, kv, args.repeats))
    elif is_transform:
        rows.append(_inverse_row(entry.level, tables.transform, kv, args.repeats))
    return rows


def _rates(runs: dict, repeats: int, count: int) -> dict[str, float]:
    """Median and best Msym/s of each run over ``repeats`` timed calls, interleaved: every run sees the same
    background load."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            began = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - began)
    rates = {f"{name}_msym_s": count / statistics.median(values) / 1e6 for name, values in times.items()}
    return rates | {f"{name}_msym_s_best": count / min(values) / 1e6 for name, values in times.items()}


def _inverse_row(level: int, transform, kv, repeats: int) -> dict:
    """Mode "inverse": a transform level's step after the streams (symbols to bf16 KV, FORMAT.md §5.5), the
    extension's one pass per token against torch's matrix product (what decode ran before), one thread each."""
    import torch

    from cachegen.codec import _ext
    from cachegen.codec import transform as tx
    from cachegen.codec.levels import SCHEME_BY_LEVEL
    from cachegen.spec import KVLayout

    symbols, _, classes = tx.quantize(kv, transform, level, 0, SCHEME_BY_LEVEL[level].token_adaptive)
    layers, _, heads, tokens, dim = symbols.shape
    layout = KVLayout(num_layers=layers, num_kv_heads=heads, head_dim=dim, dtype="bfloat16", tokens_per_chunk=tokens)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {
            "new": lambda: _ext.inverse_transform(symbols, transform, level, 0, classes, True, 1),
            "torch": lambda: tx.dequantize(symbols, transform, level, layout, 0, classes).to(torch.bfloat16),
        }
        new, old = (torch.from_numpy(runs["new"]()).view(torch.bfloat16).float(), runs["torch"]().float())
        row = {"mode": "inverse", "msym": symbols.size / 1e6, **_rates(runs, repeats, symbols.size)}
    finally:
        torch.set_num_threads(threads)
    row["share_identical"] = float((new == old).float().mean())  # the rest differ by f32 rounding of the sums
    row["torch_speedup"] = row["new_msym_s"] / row["torch_msym_s"]
    return row


def _chain_row(level: int, transform, kv, repeats: int) -> dict:
    """Mode "inverse" of the cross-layer level: symbols to bf16 KV with the prediction down the layers (FORMAT.md
    §5.7), torch's matrix products on one thread (the extension has no such pass)."""
    import torch

    from cachegen.codec import cross_layer
    from cachegen.spec import KVLayout

    symbols, _ = cross_layer.quantize(kv, transform, level, 0)
    layers, _, heads, tokens, dim = symbols.shape
    layout = KVLayout(num_layers=layers, num_kv_heads=heads, head_dim=dim, dtype="bfloat16", tokens_per_chunk=tokens)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {"torch": lambda: cross_layer.dequantize(symbols, transform, level, layout, 0).to(torch.bfloat16)}
        return {"mode": "inverse", "msym": symbols.size / 1e6, **_rates(runs, repeats, symbols.size)}
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> int:
    from cachegen.codec import _ext
    from cachegen.spec import LEVELS

    source = "synthetic"
    if not args.synthetic:
        try:
            tables, kv = _real_kv(args)
            source = "real SmolLM2-135M-Instruct KV (pydoc), tables calibrated on essays"
        except Exception as exc:  # noqa: BLE001 - no model here: say so and measure on synthetic data
            log.warning("real KV unavailable (%s); using synthetic KV", exc)
    if source == "synthetic":
        tables, kv = _synthetic_kv(args.tokens)
    baseline = _load_baseline(args.baseline) if args.baseline else None
    wanted = set(args.levels.split(",")) if args.levels else {level.name for level in LEVELS if level.id >= 1}
    rows = []
    for level in LEVELS:
        entry = tables.for_level(level.id)
        if level.name in wanted and entry is not None:
            for row in _time_level(entry, tables, kv, args, baseline):
                rows.append({"level": level.name, **row})
                log.info("codec speed %s", rows[-1])
    result = {"git_sha": git_sha(), "device": device_name(), "threads": 1, "data": source, "tokens": kv.shape[3],
              "simd_decode": _ext.has_simd_decode(),
              "repeats": args.repeats, "baseline": args.baseline or None, "rows": rows}  # fmt: skip
    emit(result, args.json)
    return 0
