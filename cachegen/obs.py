"""Logging set-up and every Prometheus metric of cachegen, declared in one place.

Metric names follow ``cachegen_<component>_<what>_<unit>``; label values come from small fixed sets (method,
status, direction, result), never keys or request ids. Only entry points call ``configure_logging``.

In prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set before it is first imported; ``cachegen
serve`` sets it, see ``server.engine``) every process writes its samples to files in that directory and
``metrics_registry`` reads them all back: that is how the connector's counters, incremented in vLLM's engine
processes, reach the API's ``/metrics``. Counters and histograms need nothing more; a gauge would need a
``multiprocess_mode``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.multiprocess import MultiProcessCollector

from cachegen.config import LogSettings

_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# --- KV store service (server/kvstore) ------------------------------------------------------------------------
STORE_REQUESTS = Counter(
    "cachegen_store_requests_total", "KV store RPCs served, by method and gRPC status.", ["method", "status"]
)
STORE_REQUEST_SECONDS = Histogram(
    "cachegen_store_request_seconds", "KV store RPC latency, by method.", ["method"], buckets=_LATENCY_BUCKETS_S
)
STORE_BYTES = Counter(
    "cachegen_store_payload_bytes_total", "Payload bytes received (in) and sent (out) by the store.", ["direction"]
)
STORE_LOOKUP_CHUNKS = Counter(
    "cachegen_store_lookup_chunks_total",
    "Chunks asked for in Lookup: hit when inside the cached prefix, miss otherwise (hit ratio = hit / all).",
    ["result"],
)
STORE_FETCH_CHUNKS = Counter("cachegen_store_fetch_chunks_total", "Chunks answered by Fetch, by outcome.", ["status"])

# --- HTTP API (server/api) ----------------------------------------------------------------------------------------
_TTFT_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
API_REQUESTS = Counter(
    "cachegen_api_requests_total", "HTTP requests answered, by route and status.", ["route", "status"]
)
API_TTFT_SECONDS = Histogram(
    "cachegen_api_ttft_seconds", "Time to first token of generation requests, by endpoint.", ["endpoint"],
    buckets=_TTFT_BUCKETS_S,
)  # fmt: skip
API_PROMPT_TOKENS = Counter("cachegen_api_prompt_tokens_total", "Prompt tokens of generation requests.", ["endpoint"])
API_CACHED_TOKENS = Counter(
    "cachegen_api_cached_tokens_total",
    "Prompt tokens not prefilled: vLLM's prefix cache plus chunks loaded from the store.", ["endpoint"],
)  # fmt: skip
API_COMPLETION_TOKENS = Counter("cachegen_api_completion_tokens_total", "Generated tokens.", ["endpoint"])
API_CONTEXT_REGISTER_SECONDS = Histogram(
    "cachegen_api_context_register_seconds", "POST /v1/contexts: prefill until every chunk is in the store.",
    buckets=_TTFT_BUCKETS_S,
)  # fmt: skip
API_CONTEXT_EVENTS = Counter(
    "cachegen_api_context_events_total",
    "Cached-context lifecycle events.",
    ["event"],  # created|deleted|expired|failed
)

# --- KV connector (cachegen/connector; counted in vLLM's engine processes, exposed in multiprocess mode) ----------
CONNECTOR_FETCHED_BYTES = Counter(
    "cachegen_connector_fetched_bytes_total", "Coded KV bytes fetched from the store, by level.", ["level"]
)
CONNECTOR_LOADED_CHUNKS = Counter(
    "cachegen_connector_loaded_chunks_total", "Chunks injected into the paged cache, by level.", ["level"]
)
CONNECTOR_FALLBACK_CHUNKS = Counter(
    "cachegen_connector_fallback_chunks_total",
    "Chunks recomputed instead of loaded, by reason (slo: planned, fetch: missing or store down, decode: rejected).", ["reason"],
)  # fmt: skip


def metrics_registry(multiprocess_dir: Path | None = None) -> CollectorRegistry:
    """What ``/metrics`` exposes: the samples every process wrote to ``multiprocess_dir`` (multiprocess mode) plus
    this process's ``process_*`` and ``python_info``, else this process's default registry."""
    if multiprocess_dir is None:
        return REGISTRY
    collected = CollectorRegistry()
    MultiProcessCollector(collected, path=str(multiprocess_dir))
    ProcessCollector(registry=collected)
    PlatformCollector(registry=collected)
    return collected


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(settings: LogSettings) -> None:
    """Route cachegen's logs to stderr, as plain text or JSON lines. Entry points call this once."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.is_json:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
