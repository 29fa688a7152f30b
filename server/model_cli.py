"""`cachegen model prepare|check`: build the bundled model dir once, or check any HF model dir."""

from __future__ import annotations

import argparse
import sys

from cachegen.config import Settings
from cachegen.errors import ModelNotReady
from cachegen.model import ensure_model, kv_layout, model_fingerprint


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["prepare", "check"], help="prepare: convert the bundled GGUF if needed")
    parser.add_argument("--model", default="", help="a local HF model dir (default: the bundled SmolLM2-135M)")


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if args.action == "prepare" and not args.model:
        print(f"preparing the bundled model under {settings.home / 'models'} (first time: ~30 s)...", flush=True)
    try:
        model_dir = ensure_model(settings.home, args.model or settings.server.model)
    except ModelNotReady as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    layout = kv_layout(model_dir, "bfloat16", settings.codec.tokens_per_chunk)
    print(f"model dir: {model_dir}")
    print(
        f"KV layout: {layout.num_layers} layers x {layout.num_kv_heads} KV heads x {layout.head_dim} dims, "
        f"{layout.bytes_per_token} bytes/token in bf16"
    )
    print(f"fingerprint: {model_fingerprint(model_dir, layout).hex()}")
    return 0
