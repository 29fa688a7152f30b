"""Metrics of a `cachegen bench serve` run, with `vllm bench serve`'s definitions, block layout and JSON keys.

TPOT of a request is (latency - TTFT) / (output tokens - 1), counted only for requests with > 1 output token
(but as 0 for the goodput check, like vLLM). Failed requests add to `failed` and to nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.serve_client import RequestOutput

GOODPUT_METRICS = ("ttft", "tpot", "e2el")
PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")
HEADERS = {
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
}


@dataclass(slots=True, frozen=True)
class MetricOptions:
    percentile_metrics: tuple[str, ...] = ("ttft", "tpot", "itl")
    percentiles: tuple[float, ...] = (99.0,)
    goodput_ms: tuple[tuple[str, float], ...] = ()  # e.g. (("ttft", 500.0),)


def parse_goodput(pairs: list[str] | None) -> tuple[tuple[str, float], ...]:
    """`["ttft:500", "e2el:2000"]` -> SLOs in ms; rejects unknown names and negative values."""
    slos = []
    for pair in pairs or []:
        name, sep, value = pair.partition(":")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not sep or name not in GOODPUT_METRICS or number < 0:
            raise ValueError(f"bad --goodput {pair!r}: use NAME:MS with NAME in {GOODPUT_METRICS} and MS >= 0")
        slos.append((name, number))
    return tuple(slos)


def parse_metric_options(percentile_metrics: str | None, percentiles: str, goodput: list[str] | None) -> MetricOptions:
    names = tuple(n.strip() for n in (percentile_metrics or "ttft,tpot,itl").split(",") if n.strip())
    unknown = [n for n in names if n not in PERCENTILE_METRICS]
    if unknown:
        raise ValueError(f"unknown --percentile-metrics {unknown}; allowed {PERCENTILE_METRICS}")
    values = tuple(float(p) for p in percentiles.split(",") if p.strip())
    return MetricOptions(names, values, parse_goodput(goodput))


def _tpot(output: RequestOutput) -> float:
    return (output.latency - output.ttft) / (output.output_tokens - 1) if output.output_tokens > 1 else 0.0


def _series(outputs: list[RequestOutput]) -> dict[str, list[float]]:
    ok = [o for o in outputs if o.success]
    return {
        "ttft": [o.ttft for o in ok],
        "tpot": [_tpot(o) for o in ok if o.output_tokens > 1],
        "itl": [gap for o in ok for gap in o.itl],
        "e2el": [o.latency for o in ok],
    }


def _stats(values_s: list[float], name: str, percentiles: tuple[float, ...]) -> dict[str, float]:
    values_ms = np.asarray(values_s or [0.0]) * 1000.0
    stats = {
        f"mean_{name}_ms": float(values_ms.mean()),
        f"median_{name}_ms": float(np.median(values_ms)),
        f"std_{name}_ms": float(values_ms.std()),
    }
    for p in percentiles:
        stats[f"p{percentile_word(p)}_{name}_ms"] = float(np.percentile(values_ms, p))
    return stats


def percentile_word(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def count_good(outputs: list[RequestOutput], slos_ms: tuple[tuple[str, float], ...]) -> int:
    """Successful requests meeting every SLO (a request with one output token has TPOT 0)."""
    measure = {"ttft": lambda o: o.ttft, "tpot": _tpot, "e2el": lambda o: o.latency}
    return sum(1 for o in outputs if o.success and all(measure[name](o) * 1000.0 <= slo for name, slo in slos_ms))


def per_second_output(outputs: list[RequestOutput], start: float) -> tuple[list[float], list[int]]:
    """Output tokens per whole second since `start`, and requests in flight per second (for the peak keys)."""
    ok = [o for o in outputs if o.success]
    if not ok:
        return [], []
    end = max(o.start_time + o.latency for o in ok)
    tokens = np.zeros(int(np.ceil(end - start)) + 1)
    running = np.zeros_like(tokens, dtype=int)
    for o in ok:
        times = np.cumsum([o.start_time + o.ttft, *o.itl]) - start if o.itl else [o.start_time + o.ttft - start]
        # Chunks may bundle several tokens; spread the request's tokens evenly over its chunks.
        for t in times:
            tokens[int(t)] += o.output_tokens / len(times)
        running[int(o.start_time - start) : int(o.start_time + o.latency - start) + 1] += 1
    return tokens.tolist(), running.tolist()


def cache_keys(outputs: list[RequestOutput]) -> dict[str, float | int | None]:
    """Our cached-token keys: totals over successful requests whose usage reported cached tokens."""
    reported = [o for o in outputs if o.success and o.cached_tokens is not None]
    cached, prompt = sum(o.cached_tokens or 0 for o in reported), sum(o.prompt_len for o in reported)
    return {
        "total_cached_tokens": cached if reported else None,
        "cached_token_ratio": cached / prompt if reported and prompt else None,
    }


def compute_metrics(outputs: list[RequestOutput], duration_s: float, options: MetricOptions, start: float) -> dict:
    """The result keys of one run (vLLM's names plus ours), without the per-request lists."""
    ok = [o for o in outputs if o.success]
    total_input, total_output = sum(o.prompt_len for o in ok), sum(o.output_tokens for o in ok)
    tokens_per_s, running = per_second_output(outputs, start)
    result: dict = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(outputs) - len(ok),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": count_good(outputs, options.goodput_ms) / duration_s if options.goodput_ms else None,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
        "max_output_tokens_per_s": max(tokens_per_s, default=0.0),
        "max_concurrent_requests": max(running, default=0),
        **cache_keys(outputs),
    }
    series = _series(outputs)
    for name in PERCENTILE_METRICS:
        result.update(_stats(series[name], name, options.percentiles))
    return result
