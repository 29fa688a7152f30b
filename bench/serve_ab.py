"""Reuse on vs reuse off under the same `cachegen bench serve` load, in one run of this script, on one machine.

    python -m bench.serve_ab --out results/serve-ab [bench serve flags, e.g. --context-tokens 3072 ...]

Starts our server twice, one after the other (never both busy at once on a small machine), each with a
fresh disk store: "on" is the default server (vLLM prefix caching + the cachegen connector loading and saving);
"off" has prefix caching off and every request carries `kv_transfer_params.cachegen = {load: false, save:
false}` through `--extra-body`. Each engine gets one warm-up request before the timed run. Writes
`reuse-on.json`, `reuse-off.json` and prints both result blocks, `bench compare`'s table and the two ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

NO_REUSE = {"kv_transfer_params": {"cachegen": {"load": False, "save": False}}}
DEFAULT_LOAD = (  # `bench serve` flags when none are given
    "--dataset-name long-doc-qa --context-tokens 3072 --questions-per-doc 8 --num-prompts 32 --output-len 8 "
    "--ignore-eos --max-concurrency 2"
)
STARTUP_TIMEOUT_S = 600


def _start(model_dir: Path, scratch: Path, name: str, is_reuse: bool) -> tuple[subprocess.Popen, str]:
    from cachegen.config import Settings
    from server.engine import api_server_argv, engine_env

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = Settings.from_env(store={"url": f"disk://{scratch / (name + '-store')}"}, server={"port": port})
    argv = api_server_argv(settings, model_dir, is_prefix_caching=is_reuse)
    with open(scratch / f"{name}.log", "w") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(argv, env=engine_env(os.environ, settings), stdout=log, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def _wait_ready(process: subprocess.Popen, base_url: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"engine at {base_url} did not become healthy (exit code {process.poll()})")


def _warm_up(base_url: str) -> None:
    model = httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"][0]["id"]
    body = {"model": model, "prompt": "Warm-up: the quick brown fox jumps over the lazy dog.", "max_tokens": 4}
    httpx.post(f"{base_url}/v1/completions", json={**body, **NO_REUSE}, timeout=300).raise_for_status()


def _one_side(name: str, is_reuse: bool, args: argparse.Namespace, model_dir: Path, scratch: Path) -> dict:
    from server.cli import main

    print(f"\n### reuse {name}: starting the server (~30-60 s)...", flush=True)
    process, base_url = _start(model_dir, scratch, f"reuse-{name}", is_reuse)
    try:
        _wait_ready(process, base_url)
        _warm_up(base_url)
        extra = [] if is_reuse else ["--extra-body", json.dumps(NO_REUSE)]
        argv = [
            "bench",
            "serve",
            "--base-url",
            base_url,
            "--tokenizer",
            str(model_dir),
            "--save-result",
            "--result-dir",
            args.out,
            "--result-filename",
            f"reuse-{name}.json",
            "--label",
            f"reuse-{name}",
            *extra,
            *args.load,
        ]
        if main(argv) != 0:
            raise SystemExit(f"the reuse-{name} run had no successful request")
    finally:
        process.terminate()
        process.wait(timeout=120)
    return json.loads((Path(args.out) / f"reuse-{name}.json").read_text())


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x" if denominator else "n/a"


def main(argv: list[str] | None = None) -> int:
    from bench.compare import compare_rows, format_table
    from cachegen.config import Settings
    from cachegen.model import ensure_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/serve-ab", help="directory for the two result JSON files")
    parser.add_argument("--model", default="", help="local HF model dir (default: bundled SmolLM2-135M)")
    args, rest = parser.parse_known_args(argv)
    args.load = rest or DEFAULT_LOAD.split()
    model_dir = ensure_model(Settings.from_env().home, args.model)
    with tempfile.TemporaryDirectory(prefix="cachegen-serve-ab-") as scratch:
        off = _one_side("off", False, args, model_dir, Path(scratch))
        on = _one_side("on", True, args, model_dir, Path(scratch))
    print("\n" + format_table(compare_rows(off, on), ("reuse off", "reuse on")))
    throughput = _ratio(on["request_throughput"], off["request_throughput"])
    ttft = _ratio(off["median_ttft_ms"], on["median_ttft_ms"])
    print(f"\nrequest throughput: reuse on / off = {throughput}; median TTFT: off / on = {ttft}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
