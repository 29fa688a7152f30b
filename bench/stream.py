"""`cachegen bench stream`: TTFT of a long cached context over a shaped link, per fetch mode and bandwidth.

Modes: recompute (no load), each fixed level (raw bf16, lossless, 8-bit, ...), and adaptive (the planner, with
the SLO). One engine stores the context at every level; then, per shaping and bandwidth, a fresh engine whose
store reads cross the shaped link measures each mode. ``--shaping``: ``tc`` (a real gRPC store behind a tbf in a
network namespace, root only; `bench.stream_link`), ``inprocess`` (the connector's token bucket around direct disk
reads), ``auto`` (tc where it works), or a comma list to measure each; the JSON says which was used, per row.
The bound is ``adaptive bytes / bandwidth + local load time`` (decode, injection and suffix prefill, measured
unshaped at the smallest level). ``--trace`` files are replayed through the planner's simulator with the measured
level sizes (SLO violation rate, level mix) and, with tc, for real: the adaptive mode over the link following the
trace, each request from its first store bytes on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from bench.stream_link import PhaseLink, phase_link

QUESTION = "\n\nQuestion: In one sentence, what is the text above about?\nAnswer:"
OUTPUT_TOKENS = 16


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--context-tokens", type=int, default=8192)
    parser.add_argument("--bandwidth", default="100mbit,1gbit,10gbit", help="comma-separated rates (tc spelling)")
    parser.add_argument("--slo", type=float, default=2.0, help="time-to-first-token target of the adaptive mode, s")
    parser.add_argument("--trace", action="append", default=[], help="bandwidth trace file(s) to simulate")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--model", default="")
    parser.add_argument(
        "--shaping",
        default="auto",
        help="tc (tbf in a network namespace; root), inprocess, auto, or a list: tc,inprocess",
    )


def _modes(slo_s: float) -> dict[str, dict]:
    from cachegen.spec import LEVELS

    modes = {level.name: {"levels": [level.id]} for level in LEVELS}
    modes["adaptive"] = {"slo_ms": slo_s * 1e3}
    return modes


def _prompt(model_dir: Path, num_tokens: int, max_model_len: int) -> tuple[list[int], list[int]]:
    import pydoc_data.topics

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    topics = pydoc_data.topics.topics
    corpus = tokenizer("\n\n".join(topics[name] for name in sorted(topics)))["input_ids"]
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    num_tokens = min(num_tokens, max_model_len - len(question) - OUTPUT_TOKENS)  # prompt + output must fit
    return corpus[:num_tokens] + question, corpus[-600:] + question


def _ensure_tables(settings, model_dir: Path) -> None:
    from cachegen.codec import default_tables_path
    from cachegen.model import kv_layout, model_fingerprint

    layout = kv_layout(model_dir, "bfloat16", settings.codec.tokens_per_chunk)
    if not default_tables_path(settings.home, model_fingerprint(model_dir, layout)).is_file():
        print("calibrating codec tables for this model (once)...", flush=True)
        subprocess.run([sys.executable, "-m", "server.cli", "calibrate", "--model", str(model_dir)], check=True)


def _shapings(requested: str) -> list[str]:
    from bench.netshape import ShapingUnavailable, resolve_shaping

    try:
        resolved = [resolve_shaping(name.strip()) for name in requested.split(",")]
    except (ShapingUnavailable, ValueError) as exc:
        raise SystemExit(f"--shaping {requested}: {exc}") from None
    return list(dict.fromkeys(resolved))


def _phase(spec_path: Path, phase: str, link: PhaseLink | None = None, target: str = "") -> tuple[dict, str]:
    """Run one engine phase; ``target`` is the bandwidth (or, with ``phase == "trace"``, the trace file)."""
    from cachegen.config import Settings
    from server.engine import engine_env

    name = "-".join([phase, *([link.shaping, Path(target).stem] if link else [])])
    out, log_path = spec_path.with_name(f"{name}.json"), spec_path.with_name(f"{name}.log")
    argv = [sys.executable, "-m", "bench.stream_phase", "--spec", str(spec_path), "--out", str(out), "--phase",
            "populate" if phase == "populate" else "measure"]  # fmt: skip
    env = engine_env(os.environ, Settings.from_env())
    if link is not None:
        argv += ["--store-url", link.store_url]
        if phase == "trace":
            argv += ["--trace", str(Path(target).resolve()), "--link", json.dumps(asdict(link.netns))]
        else:
            argv += ["--shape", link.engine_shape(target)]
        argv, env = link.argv(argv), link.env(env)
    print(f"starting a fresh engine: {name} (~30 s)...", flush=True)
    with open(log_path, "w") as log:
        code = subprocess.run(argv, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    text = log_path.read_text()
    if code != 0:
        raise SystemExit(f"engine phase {name} failed (exit {code}):\n{text[-3000:]}")
    return json.loads(out.read_text()), text


_LOADED = re.compile(r"kv loaded request=\S+ chunks=(\d+) failed_chunks=(\d+) levels=\[([\d, ]*)\] bytes=(\d+)")


def _loads_per_mode(log_text: str, modes: list[str], loads_per_mode: int) -> dict[str, list[dict]]:
    """The connector's 'kv loaded' lines, in request order, grouped by mode."""
    loads = [{"chunks": int(m[1]), "failed": int(m[2]), "levels": [int(x) for x in m[3].split(",") if x.strip()],
              "bytes": int(m[4])} for m in _LOADED.finditer(log_text)]  # fmt: skip
    return {mode: loads[i * loads_per_mode : (i + 1) * loads_per_mode] for i, mode in enumerate(modes)}


def run(args: argparse.Namespace) -> int:
    from bench.common import emit, run_header
    from bench.stream_report import build_rows, plot, print_table, simulate_traces, trace_rows
    from cachegen.config import Settings
    from cachegen.model import ensure_model
    from cachegen.spec import LEVELS

    shapings = _shapings(args.shaping)
    settings = Settings.from_env()
    model_dir = ensure_model(settings.home, args.model)
    _ensure_tables(settings, model_dir)
    prompt, warmup = _prompt(model_dir, args.context_tokens, settings.server.max_model_len)
    modes = _modes(args.slo)
    with tempfile.TemporaryDirectory(prefix="cachegen-bench-stream-") as scratch:
        spec = {"store_url": f"disk://{scratch}/store", "model_dir": str(model_dir), "prompt": prompt, "warmup": warmup,
                "repeats": args.repeats, "output_tokens": OUTPUT_TOKENS, "tokens_per_chunk": settings.codec.tokens_per_chunk,
                "all_levels": [level.name for level in LEVELS], "smallest_level": LEVELS[-1].id, "modes": modes}  # fmt: skip
        spec_path = Path(scratch) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        base, _ = _phase(spec_path, "populate")
        measured, traced = _measure_all(spec_path, spec, shapings, args)
        rows, sizes = build_rows(spec, base, measured)
    traces = simulate_traces(args.trace, sizes, base, args.slo, spec)
    print_table(rows)
    plot_path = plot(rows, args.json_path)
    result = {"bench": "stream", **run_header(settings), "shaping": shapings, "shaping_requested": args.shaping,
              "link": {name: LINKS[name] for name in shapings}, "slo_s": args.slo,
              "context_tokens": args.context_tokens, "prompt_tokens": len(prompt), "results": rows, "traces": traces,
              "traces_on_link": trace_rows(traced, rows, args.slo), "plot": plot_path}  # fmt: skip
    emit(result, args.json_path)
    return 0


LINKS = {
    "tc": "tbf on the loopback of a network namespace holding a gRPC store process and the measuring engine",
    "inprocess": "the connector's token bucket, after each direct read of the disk store",
}


def _measure_all(spec_path: Path, spec: dict, shapings: list[str], args: argparse.Namespace) -> tuple[dict, dict]:
    """Per (shaping, bandwidth): the phase's result and its loads per mode; per trace (tc only): the same."""
    modes, per_mode = list(spec["modes"]), args.repeats + 1
    measured, traced = {}, {}
    for shaping in shapings:
        with phase_link(shaping, spec["store_url"], spec_path.parent) as link:
            for bandwidth in args.bandwidth.split(","):
                link.set_rate(bandwidth)
                result, log_text = _phase(spec_path, "measure", link, bandwidth)
                measured[(shaping, bandwidth)] = (result, _loads_per_mode(log_text, modes, per_mode))
            for trace in args.trace if link.netns else []:
                result, log_text = _phase(spec_path, "trace", link, trace)
                traced[trace] = (result, _loads_per_mode(log_text, ["adaptive"], per_mode))
    return measured, traced
