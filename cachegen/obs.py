"""Logging set-up and every Prometheus metric of cachegen, declared in one place.

Metric names follow ``cachegen_<component>_<what>_<unit>``; label values come from small fixed sets (method,
status, direction, result), never keys or request ids. Only entry points call ``configure_logging``.
"""

from __future__ import annotations

import json
import logging
import sys

from prometheus_client import Counter, Histogram

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
