"""`cachegen serve`: the OpenAI-compatible HTTP API with vLLM (and the cachegen connector) in this process.

Settings are layered env (``CACHEGEN_*``) < YAML file (``--config``, same sections as ``cachegen.config.Settings``)
< flags. vLLM on CPU needs its environment (preloaded OpenMP runtime, thread binding) from the first instruction,
so the process re-executes itself once with ``server.engine.engine_env`` before anything heavy is imported. That
environment also names this server's Prometheus multiprocess directory (``<home>/metrics/serve-<pid>``, removed on
exit), so ``/metrics`` shows the counters of vLLM's child processes (the connector's) beside the API's own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from cachegen.config import Settings

_ENV_APPLIED = "CACHEGEN_ENGINE_ENV_APPLIED"
_STARTUP_TIMEOUT_S = 900


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="YAML settings file (sections as in config.py)")
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None, help="0 picks a free port (see --ready-file)")
    parser.add_argument("--model", default=None, help="local HF model dir (default: bundled SmolLM2)")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--store", default=None, help="disk:///path, memory://, redis://h:p or grpc://host:port")
    parser.add_argument("--store-token", default=None, help="bearer token for a grpc:// store")
    parser.add_argument("--api-keys-file", type=Path, default=None, help="'tenant key' per line; none: open server")
    parser.add_argument("--home", type=Path, default=None, help="model cache, local store and context records")
    parser.add_argument("--no-prefix-caching", action="store_true", help="turn off vLLM's in-memory prefix cache")
    parser.add_argument("--log-json", action="store_true", help="JSON lines logs")
    parser.add_argument("--ready-file", type=Path, default=None, help="write the base URL here once healthy")


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        is_nested = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _deep_merge(merged[key], value) if is_nested else value
    return merged


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    server = {"host": args.host, "port": args.port, "model": args.model, "served_model_name": args.served_model_name,
              "api_keys_file": args.api_keys_file}  # fmt: skip
    overrides: dict[str, Any] = {
        "server": {k: v for k, v in server.items() if v is not None},
        "store": {k: v for k, v in {"url": args.store, "token": args.store_token}.items() if v is not None},
    }
    if args.no_prefix_caching:
        overrides["server"]["is_prefix_caching"] = False
    if args.log_json:
        overrides["log"] = {"is_json": True}
    if args.home is not None:
        overrides["home"] = args.home
    return overrides


def load_settings(args: argparse.Namespace) -> Settings:
    """env < YAML < flags."""
    layered: dict[str, Any] = {}
    if args.config is not None:
        import yaml

        layered = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(layered, dict):
            raise ValueError(f"{args.config}: expected a mapping of settings sections")
    return Settings.from_env(**_deep_merge(layered, _flag_overrides(args)))


def _reexec_with_engine_env(settings: Settings) -> None:
    """Replace this process with itself under the engine environment (once; the marker stops a loop)."""
    from server.engine import engine_env, server_metrics_dir

    env = engine_env(os.environ, settings, metrics_dir=server_metrics_dir(settings, os.getpid()))
    env[_ENV_APPLIED] = "1"
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "server.cli", *sys.argv[1:]], env)


def _example(base_url: str, model_name: str, is_open: bool) -> str:
    body = json.dumps({"model": model_name, "prompt": "The capital of France is", "max_tokens": 16})
    auth = "" if is_open else " -H 'Authorization: Bearer $CACHEGEN_API_KEY'"
    return f"curl -s {base_url}/v1/completions -H 'Content-Type: application/json'{auth} -d '{body}'"


def _announce_when_healthy(server: Any, settings: Settings, engine: Any, ready_file: Path | None) -> None:
    """Poll /health; once it answers, print a working curl (and write the ready file). Stops the server when
    the engine failed to start."""
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.2)
    if not server.started:
        return
    port = server.servers[0].sockets[0].getsockname()[1]
    base_url = f"http://{settings.server.host}:{port}"
    while time.monotonic() < deadline and not server.should_exit:
        if engine.start_error is not None:
            print(f"error: the engine did not start: {engine.start_error}", file=sys.stderr, flush=True)
            server.should_exit = True
            return
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(1)
    else:
        return
    is_open = not (settings.server.api_keys or settings.server.api_keys_file)
    print(f"\ncachegen is serving {engine.model_name} at {base_url} (OpenAI-compatible). Try:\n", flush=True)
    print("  " + _example(base_url, engine.model_name, is_open) + "\n", flush=True)
    if ready_file is not None:
        ready_file.write_text(base_url)


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args)
    except (OSError, ValueError) as exc:
        print(f"error: bad settings: {exc}", file=sys.stderr)
        return 2
    if os.environ.get(_ENV_APPLIED) != "1":
        _reexec_with_engine_env(settings)
    from server.engine import METRICS_DIR_ENV, server_metrics_dir

    metrics_dir = Path(os.environ[METRICS_DIR_ENV]) if os.environ.get(METRICS_DIR_ENV) else None
    is_owned = metrics_dir is not None and metrics_dir == server_metrics_dir(settings, os.getpid())
    try:
        return _serve(settings, args.ready_file, metrics_dir, is_owned)
    finally:  # a SIGTERM ends the process inside _serve (uvicorn re-raises it); the app's shutdown removes it then
        if is_owned:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _serve(settings: Settings, ready_file: Path | None, metrics_dir: Path | None, is_metrics_dir_owned: bool) -> int:
    import uvicorn

    from cachegen import obs
    from cachegen.errors import CacheGenError
    from cachegen.model import ensure_model
    from server.api.app import create_app
    from server.api.engine_host import VllmEngine

    obs.configure_logging(settings.log)
    print("model: preparing (the bundled model is converted once, ~30 s)...", flush=True)
    try:
        model_dir = ensure_model(settings.home, settings.server.model)
        engine = VllmEngine(settings, model_dir)
        app = create_app(settings, engine, metrics_dir=metrics_dir, is_metrics_dir_owned=is_metrics_dir_owned)
    except (CacheGenError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    store = settings.store.url or settings.store_url()
    print(f"starting vLLM with the cachegen connector, KV store {store.split('?')[0]} (~30 s)...", flush=True)
    config = uvicorn.Config(app, host=settings.server.host, port=settings.server.port, access_log=False,
                            log_config=None, timeout_graceful_shutdown=10)  # fmt: skip
    server = uvicorn.Server(config)
    watcher = threading.Thread(target=_announce_when_healthy, args=(server, settings, engine, ready_file), daemon=True)
    watcher.start()
    server.run()
    return 0 if engine.start_error is None else 1
