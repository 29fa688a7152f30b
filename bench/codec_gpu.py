"""`cachegen bench codec-gpu`: CUDA decode speed per level on real KV, next to the CPU extension on the same machine.

A lent GPU machine cannot hold the model, so this benchmark reads real KV from a file exported beforehand where the
model is (`--export PATH`, a safetensors file) plus the model's calibrated tables (`cachegen calibrate`). The
exported context is tiled to `--tokens` (real values, repeated) so that whole-context figures have a full context.

Per level: bits_per_value; the public `decode` of one 256-token chunk frame into a CUDA tensor (host parsing, one
upload, kernel, status check: what the connector pays per chunk) as median latency and GB/s of bf16 written; the
same over every chunk of the context; the kernel alone on one whole-context frame (CUDA events); the CPU extension
on one core and on all cores; and whether the GPU output equals the CPU output bit for bit. Transform-coded levels
(6-9, when the tables have them) get their own rows (`_transform_row`): their values agree with the CPU's within
f32 rounding, not bit for bit, so the rows report whether the symbols are equal and the largest value difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import statistics
import time
from pathlib import Path

from bench.common import device_name, git_sha

log = logging.getLogger(__name__)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv", default="build/bench_kv.safetensors", help="real KV file written by --export")
    parser.add_argument("--tables", default="", help="calibrated tables (.cgct); default: <home>/tables/<model>")
    parser.add_argument("--export", default="", help="write --export-tokens of real KV from the model here, then stop")
    parser.add_argument("--export-tokens", type=int, default=1024, help="tokens of real text to export")
    parser.add_argument("--tokens", type=int, default=8192, help="context length (the exported KV is tiled to it)")
    parser.add_argument("--levels", default="", help="comma-separated level names (default: every coded level)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions per measurement (median)")
    parser.add_argument("--json", default="", help="write the result here")


def _export(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cachegen.codec.calibrate_cli import calibration_texts, collect_kv
    from cachegen.config import Settings
    from cachegen.model import ensure_model, kv_layout, model_fingerprint

    settings = Settings.from_env()
    model_dir = ensure_model(settings.home, "")
    layout = kv_layout(model_dir, "bfloat16", settings.codec.tokens_per_chunk)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    text = calibration_texts(4)[3]  # pydoc: not the essays the tables were calibrated on
    kv, _ = collect_kv(model, tokenizer, text, args.export_tokens)
    meta = {"model_id": model_fingerprint(model_dir, layout).hex(), "layout": json.dumps(dataclasses.asdict(layout))}
    save_file({"kv": kv.contiguous()}, args.export, metadata=meta)
    print(f"wrote {args.export}: {tuple(kv.shape)} {kv.dtype}, model {meta['model_id']}")
    return 0


def _load(args: argparse.Namespace):
    import torch
    from safetensors import safe_open

    from cachegen.codec import load_tables
    from cachegen.spec import KVLayout

    with safe_open(args.kv, "pt") as handle:
        meta, kv = handle.metadata(), handle.get_tensor("kv")
    layout, model_id = KVLayout(**json.loads(meta["layout"])), bytes.fromhex(meta["model_id"])
    if args.tables:
        path = Path(args.tables)
    else:  # imported here: the GPU machine passes --tables and may lack the settings library
        from cachegen.codec.tables import default_tables_path
        from cachegen.config import Settings

        path = default_tables_path(Settings.from_env().home, model_id)
    tables = load_tables(path.read_bytes())
    repeats = -(-args.tokens // kv.shape[3])
    return layout, model_id, tables, torch.cat([kv] * repeats, dim=3)[:, :, :, : args.tokens].contiguous()


def _median_s(fn, repeats: int) -> float:
    import torch

    fn()  # warm-up: first launch, table upload
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        began = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _streams(frame: bytes, layout, tables) -> tuple:
    """A frame checked and split as ``decode`` does: (entry, sizes, words, fused, shape, token shift) for the
    ``_ext`` calls; the shift (L, T) only on the token-adaptive level, else None."""
    from cachegen.codec import token_classes, transform_frame
    from cachegen.codec.bitstream import parse_frame
    from cachegen.codec.decode import _payload
    from cachegen.codec.levels import SCHEME_BY_LEVEL

    view = memoryview(frame).cast("B")
    parsed = parse_frame(view)
    scheme = SCHEME_BY_LEVEL[parsed.header.level]
    entry = tables.for_level(parsed.header.level)
    sizes, words, scales = _payload(view, parsed, layout, scheme.is_lossless or scheme.is_transform)
    shape = (layout.num_layers, 2, layout.num_kv_heads, parsed.header.num_tokens, entry.table_map.shape[-1])
    classes = transform_frame.read_classes(view, parsed, layout) if scheme.token_adaptive else None
    shift = None if classes is None else token_classes.SHIFTS[classes]
    return entry, sizes, words, () if scales is None else (scales, entry.bins), shape, shift


def _kernel_s(frame: bytes, layout, tables, repeats: int) -> tuple[float, object, object]:
    """Median kernel time (CUDA events) for one whole-context frame, plus its GPU output and per-stream status."""
    import torch

    from cachegen.codec import _ext

    entry, sizes, words, fused, shape, _ = _streams(frame, layout, tables)
    batch = _ext.upload_cuda(words, sizes, entry, shape, fused, "cuda")
    out = torch.empty(layout.shape(shape[3]), dtype=torch.int16, device="cuda")
    status = torch.zeros(sizes.size, dtype=torch.int32, device="cuda")
    times = []
    for _ in range(repeats + 1):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _ext.launch_cuda(batch, out, status)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times[1:]), out, status


def _host_split(frame: bytes, layout, tables, repeats: int) -> tuple[float, float]:
    """Median seconds of the host's share of one chunk decode: checking and parsing the frame, then the upload."""
    from cachegen.codec import _ext

    entry, sizes, words, fused, shape, _ = _streams(frame, layout, tables)
    return _median_s(lambda: _streams(frame, layout, tables), repeats), _median_s(
        lambda: _ext.upload_cuda(words, sizes, entry, shape, fused, "cuda"), repeats
    )


def _h2d_gb_s(num_bytes: int, repeats: int) -> dict[str, float]:
    """Host-to-GPU copy speed of one frame-sized buffer from pageable and from pinned memory."""
    import torch

    pageable = torch.empty(num_bytes, dtype=torch.uint8)
    pinned = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    return {
        "h2d_pageable_gb_s": num_bytes / _median_s(lambda: target.copy_(pageable), repeats) / 1e9,
        "h2d_pinned_gb_s": num_bytes / _median_s(lambda: target.copy_(pinned, non_blocking=True), repeats) / 1e9,
    }


def _level_row(level, layout, model_id, tables, kv, args) -> dict:
    import torch

    from cachegen.codec import _ext, decode, encode

    step = layout.tokens_per_chunk
    chunks = [kv[:, :, :, s : s + step].contiguous() for s in range(0, kv.shape[3], step)]
    frames = [encode(chunk, layout, model_id, level.id, i * step, tables=tables) for i, chunk in enumerate(chunks)]
    cpu = [decode(frame, layout, model_id, tables=tables) for frame in frames]
    outs = [torch.empty(chunk.shape, dtype=torch.bfloat16, device="cuda") for chunk in chunks]
    chunk_s = _median_s(lambda: decode(frames[0], layout, model_id, out=outs[0], tables=tables), args.repeats)
    chunk_kernel_s = _kernel_s(frames[0], layout, tables, args.repeats)[0]
    parse_s, upload_s = _host_split(frames[0], layout, tables, args.repeats)

    def whole_context() -> None:
        for frame, out in zip(frames, outs):
            decode(frame, layout, model_id, out=out, tables=tables)

    context_s = _median_s(whole_context, max(3, args.repeats // 4))
    identical = all(torch.equal(o.cpu().view(torch.int16), c.view(torch.int16)) for o, c in zip(outs, cpu))

    big = encode(kv, layout, model_id, level.id, tables=tables)
    kernel_s, big_out, status = _kernel_s(big, layout, tables, args.repeats)
    big_cpu = torch.cat(cpu, dim=3)
    identical &= bool(torch.equal(big_out.cpu(), big_cpu.view(torch.int16))) and not bool(status.any())

    entry, sizes, words, fused, shape, _ = _streams(big, layout, tables)
    cores = len(os.sched_getaffinity(0))
    cpu_times = {}
    for threads in (1, cores):
        began = time.perf_counter()
        _, st, _ = _ext.decode(words, sizes, entry, shape, fused, threads)
        cpu_times[threads] = time.perf_counter() - began
        assert st == 0
    values, out_bytes = kv.numel(), kv.numel() * 2
    row = {
        "level": level.name, "id": level.id, "bits_per_value": sum(map(len, frames)) * 8 / values,
        "gpu_chunk_decode_ms": chunk_s * 1e3, "gpu_chunk_decode_gb_s": chunks[0].numel() * 2 / chunk_s / 1e9,
        "gpu_chunk_kernel_ms": chunk_kernel_s * 1e3, "chunk_parse_ms": parse_s * 1e3,
        "chunk_upload_ms": upload_s * 1e3, "chunk_frame_bytes": len(frames[0]),
        "gpu_context_decode_ms": context_s * 1e3, "gpu_context_decode_gb_s": out_bytes / context_s / 1e9,
        "gpu_kernel_ms": kernel_s * 1e3, "gpu_kernel_gb_s": out_bytes / kernel_s / 1e9,
        "gpu_kernel_msym_s": math.prod(shape) / kernel_s / 1e6,
        "cpu_decode_msym_s_1core": math.prod(shape) / cpu_times[1] / 1e6,
        f"cpu_decode_msym_s_{cores}cores": math.prod(shape) / cpu_times[cores] / 1e6,
        "gpu_equals_cpu": identical,
    }  # fmt: skip
    log.info("level %s: %s", level.name, row)
    return row


def _transform_row(level, layout, model_id, tables, kv, args) -> dict:
    """Levels 6-9: the public decode of a chunk into a CUDA tensor (symbol kernel, then the inverse transform on
    the GPU), every chunk of the context, the symbol kernel with its upload on one whole-context frame, and the CPU
    decode on one core. Symbols must equal the CPU's; values agree within the f32 rounding of the sums (§5.5)."""
    import numpy as np
    import torch

    from cachegen.codec import _ext, decode, encode

    step = layout.tokens_per_chunk
    chunks = [kv[:, :, :, s : s + step].contiguous() for s in range(0, kv.shape[3], step)]
    frames = [encode(chunk, layout, model_id, level.id, i * step, tables=tables) for i, chunk in enumerate(chunks)]
    outs = [torch.empty(chunk.shape, dtype=torch.bfloat16, device="cuda") for chunk in chunks]
    chunk_s = _median_s(lambda: decode(frames[0], layout, model_id, out=outs[0], tables=tables), args.repeats)

    def whole_context() -> None:
        for frame, out in zip(frames, outs):
            decode(frame, layout, model_id, out=out, tables=tables)

    context_s = _median_s(whole_context, max(3, args.repeats // 4))
    cpu = torch.cat([decode(frame, layout, model_id, tables=tables) for frame in frames], dim=3)
    gpu = torch.cat([out.cpu() for out in outs], dim=3)
    big = encode(kv, layout, model_id, level.id, tables=tables)
    entry, sizes, words, _, shape, shift = _streams(big, layout, tables)
    symbols_s = _median_s(
        lambda: _ext.decode_symbols_cuda(words, sizes, entry, shape, shift, torch.device("cuda")), args.repeats
    )
    gpu_symbols, status = _ext.decode_symbols_cuda(words, sizes, entry, shape, shift, torch.device("cuda"))
    cpu_symbols, cpu_status, _ = _ext.decode(words, sizes, entry, shape, None, token_shift=shift)
    torch.set_num_threads(1)
    began = time.perf_counter()
    decode(big, layout, model_id, tables=tables)
    cpu_s = time.perf_counter() - began
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    values, out_bytes = kv.numel(), kv.numel() * 2
    row = {
        "level": level.name, "id": level.id, "bits_per_value": sum(map(len, frames)) * 8 / values,
        "gpu_chunk_decode_ms": chunk_s * 1e3, "gpu_chunk_decode_gb_s": chunks[0].numel() * 2 / chunk_s / 1e9,
        "gpu_context_decode_ms": context_s * 1e3, "gpu_context_decode_gb_s": out_bytes / context_s / 1e9,
        "gpu_symbols_with_upload_ms": symbols_s * 1e3, "gpu_symbols_msym_s": values / symbols_s / 1e6,
        "cpu_decode_msym_s_1core": values / cpu_s / 1e6,
        "symbols_equal_cpu": bool(np.array_equal(gpu_symbols.cpu().numpy(), cpu_symbols)) and not status.any()
        and cpu_status == 0,
        "values_share_identical": float((gpu.view(torch.int16) == cpu.view(torch.int16)).float().mean()),
        "values_max_abs_diff": float((gpu.float() - cpu.float()).abs().max()),
    }  # fmt: skip
    log.info("level %s: %s", level.name, row)
    return row


def run(args: argparse.Namespace) -> int:
    if args.export:
        return _export(args)
    import torch

    from cachegen.codec import has_cuda
    from cachegen.codec._ext import has_cuda_symbols
    from cachegen.codec.levels import SCHEME_BY_LEVEL
    from cachegen.spec import LEVELS

    if not has_cuda():
        raise SystemExit("needs a CUDA device and the CUDA library (`make gpu-check` builds it)")
    layout, model_id, tables, kv = _load(args)
    coded = [level for level in LEVELS if level.id >= 1 and tables.for_level(level.id) is not None]
    wanted = [level for level in coded if not args.levels or level.name in args.levels.split(",")]
    rows = [_level_row(level, layout, model_id, tables, kv, args) for level in wanted
            if not SCHEME_BY_LEVEL[level.id].is_transform]  # fmt: skip
    pca_rows = [_transform_row(level, layout, model_id, tables, kv, args) for level in wanted
                if SCHEME_BY_LEVEL[level.id].is_transform and has_cuda_symbols()]  # fmt: skip
    result = {"git_sha": git_sha(), "device": device_name(), "torch": torch.__version__, "tokens": args.tokens,
              "kv_file": args.kv, "rows": rows + pca_rows, **_h2d_gb_s(4 << 20, args.repeats)}  # fmt: skip
    header = f"{'level':10} {'b/v':>6} {'chunk ms':>9} {'kern ms':>8} {'chunk GB/s':>10} {'ctx GB/s':>9} {'kernel GB/s':>11} "
    print(header + f"{'cpu1 Msym/s':>11} {'cpuN Msym/s':>11} equal")
    for row in rows:
        many = next(v for k, v in row.items() if k.startswith("cpu_decode_msym_s_") and not k.endswith("1core"))
        print(f"{row['level']:10} {row['bits_per_value']:6.2f} {row['gpu_chunk_decode_ms']:9.3f} {row['gpu_chunk_kernel_ms']:8.3f} "
              f"{row['gpu_chunk_decode_gb_s']:10.2f} {row['gpu_context_decode_gb_s']:9.2f} "
              f"{row['gpu_kernel_gb_s']:11.1f} {row['cpu_decode_msym_s_1core']:11.1f} {many:11.1f} "
              f"{row['gpu_equals_cpu']}")  # fmt: skip
    if pca_rows:
        print(f"{'level':10} {'b/v':>6} {'chunk ms':>9} {'chunk GB/s':>10} {'ctx GB/s':>9} {'sym Msym/s':>10} "
              f"{'cpu1 Msym/s':>11} symbols-equal max-diff")  # fmt: skip
    for row in pca_rows:
        print(f"{row['level']:10} {row['bits_per_value']:6.2f} {row['gpu_chunk_decode_ms']:9.3f} "
              f"{row['gpu_chunk_decode_gb_s']:10.2f} {row['gpu_context_decode_gb_s']:9.2f} "
              f"{row['gpu_symbols_msym_s']:10.0f} {row['cpu_decode_msym_s_1core']:11.1f} "
              f"{row['symbols_equal_cpu']} {row['values_max_abs_diff']:.3g}")  # fmt: skip
    print(json.dumps(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0
