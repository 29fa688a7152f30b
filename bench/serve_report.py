"""The printed "Serving Benchmark Result" block, and the server-side `cachegen_*` Prometheus counters.

The block keeps `vllm bench serve`'s layout (40-column labels) so people and scripts that read one read both;
our own lines (cached tokens, bytes fetched, level mix, fallback chunks) come last under their own header.
"""

from __future__ import annotations

import re

import httpx

from bench.serve_metrics import HEADERS, MetricOptions, percentile_word

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
PREFIX = "cachegen_"


def _line(label: str, value: object, spec: str = "") -> str:
    return f"{label:<40} {value:{spec}}" if spec else f"{label:<40} {value!s:<10}"


def result_block(result: dict, options: MetricOptions) -> str:
    """The text `vllm bench serve` prints, from a result dict (vLLM's key names)."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]
    lines += [_line("Successful requests:", result["completed"]), _line("Failed requests:", result["failed"])]
    if result.get("max_concurrency") is not None:
        lines.append(_line("Maximum request concurrency:", result["max_concurrency"]))
    if result.get("request_rate") not in (None, "inf"):
        lines.append(_line("Request rate configured (RPS):", result["request_rate"], "<10.2f"))
    lines += [
        _line("Benchmark duration (s):", result["duration"], "<10.2f"),
        _line("Total input tokens:", result["total_input_tokens"]),
        _line("Total generated tokens:", result["total_output_tokens"]),
        _line("Request throughput (req/s):", result["request_throughput"], "<10.2f"),
    ]
    if result.get("request_goodput") is not None:
        lines.append(_line("Request goodput (req/s):", result["request_goodput"], "<10.2f"))
    lines += [
        _line("Output token throughput (tok/s):", result["output_throughput"], "<10.2f"),
        _line("Peak output token throughput (tok/s):", result["max_output_tokens_per_s"], "<10.2f"),
        _line("Peak concurrent requests:", float(result["max_concurrent_requests"]), "<10.2f"),
        _line("Total token throughput (tok/s):", result["total_token_throughput"], "<10.2f"),
    ]
    for name in options.percentile_metrics:
        short, header = HEADERS[name]
        lines.append("{s:{c}^{n}}".format(s=header, n=50, c="-"))
        lines.append(_line(f"Mean {short} (ms):", result[f"mean_{name}_ms"], "<10.2f"))
        lines.append(_line(f"Median {short} (ms):", result[f"median_{name}_ms"], "<10.2f"))
        for p in options.percentiles:
            lines.append(
                _line(f"P{percentile_word(p)} {short} (ms):", result[f"p{percentile_word(p)}_{name}_ms"], "<10.2f")
            )
    lines += _cache_lines(result)
    lines.append("=" * 50)
    return "\n".join(lines)


def _cache_lines(result: dict) -> list[str]:
    ratio = result.get("cached_token_ratio")
    fetched, fallback = result.get("cachegen_bytes_fetched"), result.get("cachegen_fallback_chunks")
    return [
        "{s:{c}^{n}}".format(s="KV Cache Reuse", n=50, c="-"),
        _line("Cached prompt tokens:", result.get("total_cached_tokens") if ratio is not None else "n/a"),
        _line("Cached-token ratio:", f"{ratio:.3f}" if ratio is not None else "n/a"),
        _line("KV bytes fetched:", fetched if fetched is not None else "n/a"),
        _line("Level mix (chunks):", result.get("cachegen_level_mix") or "n/a"),
        _line("Fallback chunks:", fallback if fallback is not None else "n/a"),
    ]


def parse_prometheus(text: str, prefix: str = PREFIX) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of the text exposition format whose name starts with `prefix`: (name, labels) -> value."""
    samples = {}
    for raw in text.splitlines():
        if raw.startswith("#") or not raw.startswith(prefix):
            continue
        match = _SAMPLE.match(raw)
        if match is None:
            continue
        labels = tuple(sorted(_LABEL.findall(match["labels"] or "")))
        try:
            samples[(match["name"], labels)] = float(match["value"])
        except ValueError:
            continue
    return samples


def scrape(base_url: str, headers: dict[str, str] | None = None) -> dict | None:
    """The server's `cachegen_*` samples, or None when it has no /metrics (or none of ours)."""
    try:
        response = httpx.get(f"{base_url}/metrics", headers=headers, timeout=10)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return parse_prometheus(response.text) or None


def server_keys(before: dict | None, after: dict | None) -> dict:
    """Bytes fetched, level mix and fallback chunks from the counters' deltas; null where not exposed."""
    keys: dict = {"cachegen_bytes_fetched": None, "cachegen_level_mix": None, "cachegen_fallback_chunks": None}
    if not after:
        return keys
    delta = {key: value - (before or {}).get(key, 0.0) for key, value in after.items()}
    fetched = [v for (name, labels), v in delta.items() if _is_fetched_bytes(name, dict(labels))]
    fallback = [v for (name, _), v in delta.items() if "fallback" in name and name.endswith("_total")]
    mix: dict[str, float] = {}
    for (name, labels), value in delta.items():
        level = dict(labels).get("level")
        if level is not None and name.endswith("chunks_total") and value:
            mix[level] = mix.get(level, 0.0) + value
    keys["cachegen_bytes_fetched"] = int(sum(fetched)) if fetched else None
    keys["cachegen_level_mix"] = {k: int(v) for k, v in sorted(mix.items())} or None
    keys["cachegen_fallback_chunks"] = int(sum(fallback)) if fallback else None
    return keys


def _is_fetched_bytes(name: str, labels: dict[str, str]) -> bool:
    if name.endswith(("_bucket", "_count", "_created")):
        return False
    if "fetch" in name and "bytes" in name:
        return True
    return name == "cachegen_store_payload_bytes_total" and labels.get("direction") == "out"
