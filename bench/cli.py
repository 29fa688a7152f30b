"""`cachegen bench NAME`: one module per benchmark, each with `register(parser)` and `run(args)`.

Benchmark modules keep heavy imports (torch, vllm) inside `run`, so registering all of them for `--help` is cheap.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS: dict[str, tuple[str, str]] = {
    "reuse": ("bench.reuse", "TTFT of full prefill vs KV loaded from the local store, per context length"),
    "codec": ("bench.codec", "size, fidelity and throughput per codec level"),
    "codec-speed": (
        "bench.codec_speed",
        "one-core decode Msym/s per level on real KV: rANS beside an old build, transform inverses beside torch",
    ),
    "codec-gpu": ("bench.codec_gpu", "CUDA decode speed per level on exported real KV, next to the CPU extension"),
    "store": ("bench.store", "KV store put/fetch throughput and lookup latency per backend"),
    "stream": ("bench.stream", "TTFT over a shaped link per fetch mode (each level, adaptive) and bandwidth"),
    "serve": ("bench.serve", "load test of an OpenAI-compatible server (vllm bench serve-compatible)"),
    "compare": ("bench.compare", "side-by-side table of two `bench serve` result JSON files"),
}


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="NAME")
    for name, (module_name, help_text) in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        child = sub.add_parser(name, help=help_text, description=help_text)
        module.register(child)
        child.set_defaults(bench_module=module_name)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(args.bench_module).run(args) or 0)
