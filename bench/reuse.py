"""`cachegen bench reuse`: TTFT of a full prefill vs the same prompt with its prefix loaded from the local store.

Two fresh engine processes per run, sharing only a disk store: the first measures full prefill (loading off) and
then stores each context's chunks; the second, which has never seen the contexts, measures TTFT with the
prefix loaded from the store. vLLM's in-memory prefix cache is off in both, so every repetition prefills or
loads again. Greedy outputs (32 tokens) of both engines are compared. TTFT is the wall time of a 1-token
generate call on the offline engine, after a warm-up request on unrelated text.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTION = "\n\nQuestion: In one sentence, what is the text above about?\nAnswer:"
NUM_OUTPUT_TOKENS = 32


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--context-tokens", default="1024,4096,8192", help="comma-separated context lengths")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per length and mode (median)")
    parser.add_argument("--json", dest="json_path", default=None, help="write the result JSON here")
    parser.add_argument("--model", default="", help="local HF model dir (default: bundled SmolLM2-135M)")


def _prompts(model_dir: Path, lengths: list[int], max_model_len: int) -> dict[str, list[int]]:
    """One real-text prompt per length (CPython's documentation topics), distinct text for each."""
    import pydoc_data.topics

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    topics = pydoc_data.topics.topics
    corpus = tokenizer("\n\n".join(topics[name] for name in sorted(topics)))["input_ids"]
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    prompts, offset = {}, 0
    max_context = max_model_len - len(question) - NUM_OUTPUT_TOKENS
    for length in lengths:
        if length > max_context:
            print(
                f"note: a {length}-token context is cut to {max_context} so prompt + output fit in "
                f"{max_model_len} positions",
                flush=True,
            )
            length = max_context
        if offset + length > len(corpus):
            raise SystemExit(f"not enough text for a {length}-token context")
        prompts[str(len(prompts))] = corpus[offset : offset + length] + question
        offset += length
    prompts["warmup"] = corpus[-600:] + question
    return prompts


def _expected_keys(spec: dict, ids: list[int]):
    from cachegen.model import kv_layout, model_fingerprint
    from cachegen.spec import chunk_keys

    model_dir = Path(spec["model_dir"])
    layout = kv_layout(model_dir, "bfloat16", spec["tokens_per_chunk"])
    keys = chunk_keys(ids, layout, model_fingerprint(model_dir, layout), tenant="")
    return keys[: (len(ids) - 1) // layout.tokens_per_chunk]


def _wait_saved(store_url: str, keys: list, timeout_s: float = 300) -> int:
    """Saves finish on the engine's saver thread: wait until all are in the store; returns their bytes."""
    from cachegen.store import open_store

    store = open_store(store_url)
    deadline = time.monotonic() + timeout_s
    while len(found := store.lookup(keys)) < len(keys):
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(found)} of {len(keys)} chunks reached the store")
        time.sleep(0.2)
    return sum(min(info.levels.values()) for info in found)


def _phase(args: argparse.Namespace) -> int:
    """Inside one engine process: time every prompt with loading on ("reuse") or off ("full")."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from cachegen.config import Settings
    from server.engine import llm_kwargs

    spec = json.loads(Path(args.spec).read_text())
    settings = Settings.from_env(store={"url": spec["store_url"]})
    llm = LLM(**llm_kwargs(settings, Path(spec["model_dir"]), is_connector=True, is_prefix_caching=False))
    is_load = args.phase == "reuse"

    def generate(ids: list[int], max_tokens: int, save: bool = False):
        switches = {"kv_transfer_params": {"cachegen": {"load": is_load, "save": save}}}
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=switches)
        started = time.perf_counter()
        output = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
        return time.perf_counter() - started, output

    generate(spec["prompts"]["warmup"], 1)
    results = {}
    for name, ids in spec["prompts"].items():
        if name == "warmup":
            continue
        timed = [generate(ids, 1) for _ in range(spec["repeats"])]
        _, output = generate(ids, NUM_OUTPUT_TOKENS, save=not is_load)
        results[name] = {
            "ttft_s": [seconds for seconds, _ in timed],
            "cached_tokens": [out.num_cached_tokens or 0 for _, out in timed],
            "output": list(output.outputs[0].token_ids),
        }
        if not is_load:
            results[name]["bytes_stored"] = _wait_saved(spec["store_url"], _expected_keys(spec, ids))
        print(f"  {args.phase}: {len(ids)}-token prompt, TTFT {sorted(results[name]['ttft_s'])}", flush=True)
    Path(args.out).write_text(json.dumps(results))
    return 0


def _run_phase(phase: str, spec_path: Path, settings) -> dict:
    from server.engine import engine_env

    out_path = spec_path.with_name(f"{phase}.json")
    argv = [sys.executable, "-m", "bench.reuse", "--phase", phase, "--spec", str(spec_path), "--out", str(out_path)]
    print(f"starting a fresh engine for '{phase}' (~30 s to start)...", flush=True)
    env = engine_env(os.environ, settings)
    env["VLLM_LOGGING_LEVEL"] = "WARNING"  # keep the benchmark's own lines readable
    log_path = spec_path.with_name(f"{phase}.log")
    with open(log_path, "w") as log:
        code = subprocess.run(argv, env=env, stderr=log, check=False).returncode
    if code != 0:
        raise SystemExit(f"the '{phase}' engine failed (exit {code}):\n{log_path.read_text()[-3000:]}")
    return json.loads(out_path.read_text())


def run(args: argparse.Namespace) -> int:
    from bench.common import emit, median, run_header
    from cachegen.config import Settings
    from cachegen.model import ensure_model

    lengths = [int(part) for part in args.context_tokens.split(",")]
    with tempfile.TemporaryDirectory(prefix="cachegen-bench-reuse-") as scratch:
        settings = Settings.from_env(store={"url": f"disk://{scratch}/store"})
        model_dir = ensure_model(settings.home, args.model)
        spec = {
            "store_url": settings.store_url(),
            "model_dir": str(model_dir),
            "repeats": args.repeats,
            "tokens_per_chunk": settings.codec.tokens_per_chunk,
            "prompts": _prompts(model_dir, lengths, settings.server.max_model_len),
        }
        spec_path = Path(scratch) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        full = _run_phase("full", spec_path, settings)
        reuse = _run_phase("reuse", spec_path, settings)
    rows = []
    for index, length in enumerate(lengths):
        before, after = full[str(index)], reuse[str(index)]
        row = {
            "context_tokens": length,
            "prompt_tokens": len(spec["prompts"][str(index)]),
            "ttft_full_s": median(before["ttft_s"]),
            "ttft_reuse_s": median(after["ttft_s"]),
            "bytes_loaded": before["bytes_stored"],
            "cached_tokens": median(after["cached_tokens"]),
            "outputs_identical": before["output"] == after["output"],
            "ttft_full_all_s": before["ttft_s"],
            "ttft_reuse_all_s": after["ttft_s"],
        }
        row["speedup"] = row["ttft_full_s"] / row["ttft_reuse_s"]
        rows.append(row)
    _print_table(rows)
    emit(
        {"bench": "reuse", **run_header(settings), "save_levels": settings.codec.save_levels, "results": rows},
        args.json_path,
    )
    return 0 if all(row["outputs_identical"] for row in rows) else 1


def _print_table(rows: list[dict]) -> None:
    print(f"\n{'context':>8} {'TTFT full':>10} {'TTFT reuse':>11} {'speedup':>8} {'MB loaded':>10} {'identical':>10}")
    for row in rows:
        print(
            f"{row['context_tokens']:>8} {row['ttft_full_s']:>9.3f}s {row['ttft_reuse_s']:>10.3f}s "
            f"{row['speedup']:>7.1f}x {row['bytes_loaded'] / 1e6:>10.1f} {row['outputs_identical']!s:>10}"
        )


if __name__ == "__main__":
    # Phase mode: `python -m bench.reuse --phase full|reuse --spec F --out O`, one engine per process.
    phase_parser = argparse.ArgumentParser()
    phase_parser.add_argument("--phase", choices=["full", "reuse"], required=True)
    phase_parser.add_argument("--spec", required=True)
    phase_parser.add_argument("--out", required=True)
    sys.exit(_phase(phase_parser.parse_args()))
