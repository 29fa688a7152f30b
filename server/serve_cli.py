"""`cachegen serve`: vLLM's OpenAI-compatible server with the cachegen connector and the local store.

Starts the engine as a child process (so the CPU environment, e.g. the preloaded OpenMP runtime, applies from
its first instruction), waits until it is healthy, prints how to query it, and stops it on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from cachegen.config import Settings
from cachegen.errors import ModelNotReady
from cachegen.model import ensure_model
from server.engine import api_server_argv, engine_env

_STARTUP_TIMEOUT_S = 600


def register(parser: argparse.ArgumentParser) -> None:
    defaults = Settings.from_env()
    parser.add_argument("--host", default=defaults.server.host)
    parser.add_argument("--port", type=int, default=defaults.server.port)
    parser.add_argument("--model", default=defaults.server.model, help="local HF model dir (default: bundled SmolLM2)")
    parser.add_argument("--store", default=defaults.store.url, help="store URL (default: disk://<home>/kv)")
    parser.add_argument("--no-prefix-caching", action="store_true", help="turn off vLLM's in-memory prefix cache")


def _wait_healthy(base_url: str, child: subprocess.Popen) -> bool:
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    while time.monotonic() < deadline and child.poll() is None:
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(1)
    return False


def _example(base_url: str, model_name: str) -> str:
    body = json.dumps({"model": model_name, "prompt": "The capital of France is", "max_tokens": 16})
    return f"curl -s {base_url}/v1/completions -H 'Content-Type: application/json' -d '{body}'"


def run(args: argparse.Namespace) -> int:
    overrides = {"server": {"host": args.host, "port": args.port, "model": args.model}}
    if args.store:
        overrides["store"] = {"url": args.store}
    settings = Settings.from_env(**overrides)
    print("model: preparing (the bundled model is converted once, ~30 s)...", flush=True)
    try:
        model_dir = ensure_model(settings.home, settings.server.model)
    except ModelNotReady as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    argv = api_server_argv(settings, model_dir, is_prefix_caching=not args.no_prefix_caching)
    print(f"starting vLLM with the cachegen connector, KV store {settings.store_url()} (~30 s)...", flush=True)
    child = subprocess.Popen(argv, env=engine_env(os.environ, settings))
    base_url = f"http://{settings.server.host}:{settings.server.port}"
    try:
        if not _wait_healthy(base_url, child):
            print("error: the engine did not become healthy; see its log above", file=sys.stderr)
            child.terminate()
            return 1
        print(f"\ncachegen is serving {model_dir.name} at {base_url} (OpenAI-compatible). Try:\n", flush=True)
        print("  " + _example(base_url, settings.server.served_model_name or model_dir.name) + "\n", flush=True)
        return child.wait()
    except KeyboardInterrupt:
        child.send_signal(signal.SIGINT)
        return child.wait()
