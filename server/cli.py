"""The `cachegen` command. Each subcommand lives in its own module and is imported only when used."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help). Each module exposes `register(parser)` to add its flags and `run(args) -> int`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "model": ("server.model_cli", "prepare or check the model directory"),
    "serve": ("server.api_cli", "start the OpenAI-compatible inference server (vLLM + cached contexts)"),
    "serve-vllm": ("server.serve_cli", "vLLM's own OpenAI server with the cachegen connector (no contexts API)"),
    "store": ("server.kvstore.cli", "run the KV store service"),
    "bench": ("bench.cli", "benchmarks: reuse, codec, codec-speed, codec-gpu, store, stream, serve, compare"),
    "calibrate": ("cachegen.codec.calibrate_cli", "compute per-model probability tables"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cachegen",
        description="Long-context LLM serving that reuses coded KV caches across requests and machines.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = argv[0] if argv else None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            importlib.import_module(module_name).register(child)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
