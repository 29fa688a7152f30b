"""`cachegen bench serve`: a load test for any OpenAI-compatible server, compatible with `vllm bench serve`.

Same flags, printed "Serving Benchmark Result" block and `--save-result` JSON keys as vLLM's (TTFT, TPOT, ITL,
E2EL; request/token throughput; goodput under `--goodput` SLOs), plus ours: the cached-token ratio from
`usage.prompt_tokens_details.cached_tokens`, and from the server's `cachegen_*` Prometheus counters (diffed
across the run) bytes fetched, level mix and fallback chunks, null when the server does not expose them.
Datasets: random, long-doc-qa (SQuAD v2, RULER-style), multi-round chat, custom JSONL (see bench/serve_data.py).

    cachegen bench serve --base-url http://127.0.0.1:8000 --dataset-name long-doc-qa --context-tokens 4096 \\
        --questions-per-doc 4 --num-prompts 16 --max-concurrency 2 --save-result --result-dir results
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import datetime
from pathlib import Path

DATASETS = ("random", "long-doc-qa", "multi-round", "custom")
DETAILED_KEYS = ("input_lens", "output_lens", "ttfts", "itls", "start_times", "generated_texts", "errors")


def register(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", default=None, help="server URL, e.g. http://127.0.0.1:8000 (else --host/--port)")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions")
    server.add_argument("--model", default=None, help="model name to request (default: the server's first model)")
    server.add_argument("--tokenizer", default=None, help="local tokenizer dir for token counts (never downloads)")
    server.add_argument("--header", action="append", default=[], metavar="KEY=VALUE", help="extra HTTP header")
    server.add_argument("--extra-body", default=None, metavar="JSON", help="fields merged into every request body")
    load = parser.add_argument_group("load")
    load.add_argument("--num-prompts", type=int, default=100)
    load.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (inf: all at once)")
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals (1: Poisson)")
    load.add_argument("--max-concurrency", type=int, default=None)
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--temperature", type=float, default=0.0)
    load.add_argument("--ignore-eos", action="store_true", help="ask the server to always generate max_tokens")
    load.add_argument("--disable-tqdm", action="store_true")
    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset-name", choices=DATASETS, default="random")
    data.add_argument("--dataset-path", default=None, help="custom: JSONL with {'prompt': ..., 'output_tokens': N}")
    data.add_argument("--random-input-len", type=int, default=1024)
    data.add_argument("--random-output-len", type=int, default=128)
    data.add_argument("--random-range-ratio", type=float, default=0.0)
    data.add_argument("--context-tokens", type=int, default=2048, help="long-doc-qa/multi-round context size")
    data.add_argument("--questions-per-doc", type=int, default=4, help="long-doc-qa: questions per document")
    data.add_argument("--num-turns", type=int, default=4, help="multi-round: turns per session")
    data.add_argument("--output-len", type=int, default=None, help="max_tokens for every dataset")
    out = parser.add_argument_group("results")
    out.add_argument("--save-result", action="store_true")
    out.add_argument("--save-detailed", action="store_true", help="also save per-request lists")
    out.add_argument("--result-dir", default=None)
    out.add_argument("--result-filename", default=None)
    out.add_argument("--label", default=None)
    out.add_argument("--percentile-metrics", default=None, help="comma list of ttft,tpot,itl,e2el")
    out.add_argument("--metric-percentiles", default="99", help='comma list, e.g. "50,90,99"')
    out.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS", help="SLOs: ttft:MS tpot:MS e2el:MS")
    out.add_argument("--plot", default=None, metavar="DIR", help="write a TTFT CDF and throughput-over-time PNGs")


def _client_config(args: argparse.Namespace, base_url: str, model: str):
    from bench.serve_client import ClientConfig

    extra = json.loads(args.extra_body) if args.extra_body else {}
    if not isinstance(extra, dict):
        raise TypeError("--extra-body must be a JSON object")
    headers = dict(item.split("=", 1) for item in args.header)
    sampling: dict = {"temperature": args.temperature}
    if args.ignore_eos:
        sampling["ignore_eos"] = True
    return ClientConfig(base_url, args.endpoint, model, sampling=sampling, extra_body=extra, headers=headers)


def _dataset_config(args: argparse.Namespace):
    from bench.serve_data import DatasetConfig

    return DatasetConfig(
        name=args.dataset_name,
        num_prompts=args.num_prompts,
        seed=args.seed,
        path=args.dataset_path,
        random_input_len=args.random_input_len,
        random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio,
        context_tokens=args.context_tokens,
        questions_per_doc=args.questions_per_doc,
        num_turns=args.num_turns,
        output_len=args.output_len,
    )


def _first_model(base_url: str, headers: dict[str, str]) -> str:
    import httpx

    response = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def result_filename(args: argparse.Namespace, model_id: str, label: str, date: str) -> str:
    """vLLM's naming: `{label}-{rate}qps[-concurrency{N}]-{model}-{date}.json` unless `--result-filename`."""
    concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency is not None else ""
    name = args.result_filename or f"{label}-{args.request_rate}qps{concurrency}-{model_id.split('/')[-1]}-{date}.json"
    return str(Path(args.result_dir) / name) if args.result_dir else name


def _detailed(outputs) -> dict:
    return {
        "input_lens": [o.prompt_len for o in outputs],
        "output_lens": [o.output_tokens if o.success else 0 for o in outputs],
        "ttfts": [o.ttft for o in outputs],
        "itls": [o.itl for o in outputs],
        "start_times": [o.start_time for o in outputs],
        "generated_texts": [o.generated_text for o in outputs],
        "errors": [o.error for o in outputs],
    }


def _run_load(args, client, samples, on_done):
    from bench.serve_client import arrival_intervals, run_load

    intervals = arrival_intervals(len(samples), args.request_rate, args.burstiness, args.seed)
    return asyncio.run(run_load(client, samples, intervals, args.max_concurrency, on_done))


def _print_start(args, samples) -> None:
    pacing = "all at once" if args.request_rate == float("inf") else f"{args.request_rate} req/s"
    shape = "Poisson" if args.burstiness == 1.0 else f"gamma, burstiness {args.burstiness}"
    print(
        f"dataset {args.dataset_name}: {len(samples)} requests, ~{sum(s.prompt_len for s in samples)} prompt tokens",
        flush=True,
    )
    print(f"traffic: {pacing} ({shape}), max concurrency {args.max_concurrency or 'unlimited'}", flush=True)


def benchmark(args: argparse.Namespace) -> dict:
    """Build the dataset, run the load, and return the result dict (vLLM's keys plus ours)."""
    from tqdm import tqdm

    from bench.serve_data import TokenCounter, build_dataset
    from bench.serve_metrics import compute_metrics, parse_metric_options
    from bench.serve_report import scrape, server_keys

    options = parse_metric_options(args.percentile_metrics, args.metric_percentiles, args.goodput)
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    headers = dict(item.split("=", 1) for item in args.header)
    model = args.model or _first_model(base_url, headers)
    client = _client_config(args, base_url, model)
    samples = build_dataset(_dataset_config(args), TokenCounter(args.tokenizer))
    _print_start(args, samples)
    before = scrape(base_url, headers)
    with tqdm(total=len(samples), disable=args.disable_tqdm) as bar:
        start = time.perf_counter()
        outputs = _run_load(args, client, samples, lambda _: bar.update(1))
        duration = time.perf_counter() - start
    result = compute_metrics(outputs, duration, options, start)
    result.update(server_keys(before, scrape(base_url, headers)))
    result["error_samples"] = sorted({o.error for o in outputs if not o.success})[:5]
    return {"model_id": model, "options": options, "outputs": outputs, "start": start, "metrics": result}


def _result(args: argparse.Namespace, run_out: dict, date: str, label: str) -> dict:
    """vLLM's run keys, then the metrics, then (with --save-detailed) the per-request lists."""
    from bench.common import run_header

    config = {k: v for k, v in sorted(vars(args).items()) if k not in ("bench", "command", "bench_module")}
    result = {
        "bench": "serve",
        **run_header(config),
        "date": date,
        "backend": "openai-chat" if args.endpoint.endswith("chat/completions") else "openai",
        "label": label,
        "endpoint": args.endpoint,
        "model_id": run_out["model_id"],
        "tokenizer_id": args.tokenizer or run_out["model_id"],
        "num_prompts": args.num_prompts,
        "dataset_name": args.dataset_name,
        "request_rate": args.request_rate if args.request_rate < float("inf") else "inf",
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "extra_body": args.extra_body,
        **run_out["metrics"],
    }
    if args.save_detailed:
        result.update(_detailed(run_out["outputs"]))
    return result


def run(args: argparse.Namespace) -> int:
    import httpx

    from bench.common import emit
    from bench.serve_report import result_block

    date = datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        run_out = benchmark(args)
    except (ValueError, TypeError, RuntimeError, OSError, httpx.HTTPError) as exc:  # bad flags, data, server
        print(f"error: {exc}", file=sys.stderr)
        return 2
    label = args.label or ("openai-chat" if args.endpoint.endswith("chat/completions") else "openai")
    result = _result(args, run_out, date, label)
    for error in result["error_samples"]:
        print(f"failed request: {error}", flush=True)
    print(result_block(result, run_out["options"]), flush=True)
    if args.plot:
        from bench.serve_plot import write_plots

        for path in write_plots(run_out["outputs"], run_out["start"], args.plot, label):
            print(f"plot: {path}", flush=True)
    path = result_filename(args, run_out["model_id"], label, date) if args.save_result else None
    emit(result, path)
    if path:
        print(f"saved: {path}", flush=True)
    return 0 if result["completed"] else 1
