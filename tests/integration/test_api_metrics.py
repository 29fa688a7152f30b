"""`cachegen serve`'s ``/metrics`` shows the connector's counters, which are incremented in vLLM's engine processes
(prometheus_client multiprocess mode), beside the API's own metrics and vLLM's; `cachegen bench serve` reads them.

The node here runs without vLLM's prefix cache: with it, a repeated prompt is answered from vLLM's own memory and
the connector loads nothing from the store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.serve_report import parse_prometheus, server_keys
from cachegen.config import Settings
from server.engine import server_metrics_dir
from tests.integration.api_servers import (
    TOKENS_PER_CHUNK,
    ApiNode,
    cached_tokens,
    num_chunks_stored,
    start_node,
    wait_node,
    wait_until,
)
from tests.integration.test_api_server import corpus_text

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def store_node(tmp_path_factory) -> Iterator[tuple[ApiNode, Path]]:
    """A `cachegen serve` node without vLLM's prefix cache, and its `disk://` store directory."""
    work = tmp_path_factory.mktemp("metrics-node")
    store_dir = work / "kv"
    node = start_node(work, "metrics", f"disk://{store_dir}", is_prefix_caching=False)
    try:
        yield wait_node(node), store_dir
    finally:
        node.stop()


def _total(samples: dict, name: str) -> float:
    return sum(value for (sample, _), value in samples.items() if sample == name)


def test_connector_counters_reach_the_api_metrics(store_node: tuple[ApiNode, Path], tokenizer):
    node, store_dir = store_node
    http, sdk = node.http("alice"), node.sdk("alice")
    prompt = corpus_text(150000, 3000) + "\n\nQuestion: what is the text above about?\nAnswer:"
    ids = list(tokenizer(prompt)["input_ids"])
    num_chunks = len(ids) // TOKENS_PER_CHUNK
    assert len(ids) > 600 and num_chunks >= 2

    first = sdk.completions.create(model=node.model, prompt=prompt, max_tokens=4, temperature=0)
    assert cached_tokens(first.usage) == 0
    # Saves finish on the connector's saver thread after the response.
    assert wait_until(lambda: num_chunks_stored(store_dir, ids, "alice") == num_chunks, timeout_s=60.0)
    before = parse_prometheus(http.get("/metrics").text)
    second = sdk.completions.create(model=node.model, prompt=prompt, max_tokens=4, temperature=0)
    text = http.get("/metrics").text
    after = parse_prometheus(text)

    num_loaded = cached_tokens(second.usage) // TOKENS_PER_CHUNK
    assert num_loaded >= num_chunks - 1 >= 1  # the chunk holding the last prompt token may be recomputed
    assert _total(before, "cachegen_connector_loaded_chunks_total") == 0  # the first request missed the store
    assert _total(after, "cachegen_connector_loaded_chunks_total") == num_loaded
    assert _total(after, "cachegen_connector_fetched_bytes_total") > 0
    assert _total(after, "cachegen_connector_fallback_chunks_total") == 0
    assert after[("cachegen_api_ttft_seconds_count", (("endpoint", "completions"),))] == 2
    assert "cachegen_api_ttft_seconds_bucket{" in text and "vllm:prompt_tokens_total" in text  # vLLM's own, too
    assert second.choices[0].text == first.choices[0].text

    keys = server_keys(before, after)  # what `cachegen bench serve` reports for a run of just the second request
    assert keys["cachegen_bytes_fetched"] == _total(after, "cachegen_connector_fetched_bytes_total") > 0
    assert sum(keys["cachegen_level_mix"].values()) == num_loaded
    assert keys["cachegen_fallback_chunks"] is None


def test_metrics_dir_is_per_server_and_removed_on_exit(store_node: tuple[ApiNode, Path]):
    node, _ = store_node
    metrics_dir = server_metrics_dir(Settings.from_env(), node.process.pid)
    assert len(list(metrics_dir.glob("*.db"))) >= 2  # the API process and vLLM's engine process(es)
    node.stop()
    assert not metrics_dir.exists()  # removed by the app's shutdown (uvicorn then re-raises the SIGTERM)
