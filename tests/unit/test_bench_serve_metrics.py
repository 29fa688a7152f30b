"""Pure parts of `cachegen bench serve`: arrivals, request bodies, SSE parsing (in-process transport), metric
math, goodput, the printed block, Prometheus diffs and the compare table. No network."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

from bench.compare import Row, compare_rows, format_table
from bench.serve_client import ClientConfig, RequestOutput, arrival_intervals, request_body, send_request
from bench.serve_data import SampleRequest
from bench.serve_metrics import MetricOptions, compute_metrics, count_good, parse_goodput, parse_metric_options
from bench.serve_report import parse_prometheus, result_block, server_keys

CONFIG = ClientConfig("http://test", "/v1/completions", "m", sampling={"temperature": 0.0})


def test_poisson_intervals_are_seeded_with_the_right_mean():
    gaps = arrival_intervals(20000, request_rate=4.0, burstiness=1.0, seed=1)
    assert gaps == arrival_intervals(20000, 4.0, 1.0, seed=1)
    assert gaps != arrival_intervals(20000, 4.0, 1.0, seed=2)
    assert np.mean(gaps) == pytest.approx(0.25, rel=0.03)
    assert np.std(gaps) == pytest.approx(0.25, rel=0.05)  # exponential: std == mean


def test_burstiness_keeps_the_mean_and_changes_the_spread():
    smooth = arrival_intervals(20000, 2.0, burstiness=4.0, seed=0)
    bursty = arrival_intervals(20000, 2.0, burstiness=0.25, seed=0)
    assert np.mean(smooth) == pytest.approx(0.5, rel=0.03) and np.mean(bursty) == pytest.approx(0.5, rel=0.1)
    assert np.std(smooth) == pytest.approx(0.25, rel=0.05)  # gamma: std = mean / sqrt(shape)
    assert np.std(bursty) == pytest.approx(1.0, rel=0.1)


def test_infinite_rate_sends_at_once_and_bad_burstiness_is_refused():
    assert arrival_intervals(3, float("inf"), 1.0, 0) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        arrival_intervals(3, 1.0, 0.0, 0)


def test_request_bodies_for_both_endpoints_merge_extra_body_last():
    sample = SampleRequest("hi", 1, 8)
    config = ClientConfig("u", "/v1/completions", "m", {"temperature": 0.0}, {"kv_transfer_params": {"x": 1}})
    body = request_body(config, sample, [])
    assert body["prompt"] == "hi" and body["max_tokens"] == 8 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and body["kv_transfer_params"] == {"x": 1}
    chat = ClientConfig("u", "/v1/chat/completions", "m")
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert request_body(chat, sample, history)["messages"][-1] == {"role": "user", "content": "hi"}
    assert request_body(config, sample, history)["prompt"] == "User: a\n\nAssistant: b\n\nUser: hi\n\nAssistant:"


def _sse(events: list[dict]) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


def _send(handler, endpoint: str = "/v1/completions") -> RequestOutput:
    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            config = ClientConfig("http://test", endpoint, "m")
            return await send_request(client, config, {"model": "m"}, prompt_len=5)

    return asyncio.run(go())


def test_stream_parsing_counts_text_chunks_and_usage():
    usage = {"prompt_tokens": 40, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 32}}
    events = [
        {"choices": [{"text": "a"}]},
        {"choices": [{"text": "b"}]},
        {"choices": [{"text": "c"}]},
        {"choices": [], "usage": usage},
    ]
    output = _send(lambda request: httpx.Response(200, content=_sse(events)))
    assert output.success and output.generated_text == "abc"
    assert (output.prompt_len, output.output_tokens, output.cached_tokens) == (40, 3, 32)
    assert len(output.itl) == 2 and output.latency >= output.ttft > 0


def test_chat_stream_skips_the_empty_role_chunk():
    events = [
        {"choices": [{"delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"delta": {"content": "x"}}]},
        {"choices": [{"delta": {"content": "y"}}]},
    ]
    output = _send(lambda request: httpx.Response(200, content=_sse(events)), "/v1/chat/completions")
    assert output.generated_text == "xy" and output.output_tokens == 2 and len(output.itl) == 1
    assert output.cached_tokens is None and output.prompt_len == 5  # no usage: the dataset's estimate stays


def test_an_immediate_eos_is_one_output_with_a_ttft():
    usage = {"prompt_tokens": 9, "completion_tokens": 1}
    events = [{"choices": [{"text": "", "finish_reason": "stop"}]}, {"choices": [], "usage": usage}]
    output = _send(lambda request: httpx.Response(200, content=_sse(events)))
    assert output.success and output.ttft > 0 and output.output_tokens == 1 and output.generated_text == ""


def test_failures_are_recorded_not_raised():
    not_found = _send(lambda request: httpx.Response(404, json={"error": {"message": "no such model"}}))
    assert not not_found.success and "HTTP 404" in not_found.error and "no such model" in not_found.error
    in_stream = _send(lambda request: httpx.Response(200, content=_sse([{"error": {"message": "boom"}}])))
    assert not in_stream.success and "boom" in in_stream.error
    empty = _send(lambda request: httpx.Response(200, content=b"data: [DONE]\n\n"))
    assert not empty.success and "without any output" in empty.error

    def refuse(request):
        raise httpx.ConnectError("refused")

    assert "ConnectError" in _send(refuse).error


def _output(ttft: float, latency: float, tokens: int, start: float = 0.0, cached: int | None = None) -> RequestOutput:
    gaps = [(latency - ttft) / (tokens - 1)] * (tokens - 1) if tokens > 1 else []
    return RequestOutput(
        success=True,
        prompt_len=100,
        output_tokens=tokens,
        ttft=ttft,
        itl=gaps,
        latency=latency,
        start_time=start,
        cached_tokens=cached,
    )


def test_metric_math_matches_vllm_definitions():
    outputs = [_output(0.1, 1.1, 11, cached=50), _output(0.3, 0.3, 1, cached=0), RequestOutput(error="x")]
    options = MetricOptions(("ttft", "tpot"), (50.0, 99.0), parse_goodput(["ttft:200"]))
    result = compute_metrics(outputs, 2.0, options, start=0.0)
    assert (result["completed"], result["failed"]) == (2, 1)
    assert result["request_throughput"] == 1.0 and result["request_goodput"] == 0.5
    assert result["total_input_tokens"] == 200 and result["total_output_tokens"] == 12
    assert result["mean_ttft_ms"] == pytest.approx(200.0) and result["p50_ttft_ms"] == pytest.approx(200.0)
    assert result["mean_tpot_ms"] == pytest.approx(100.0)  # the 1-token request has no TPOT
    assert result["mean_itl_ms"] == pytest.approx(100.0) and result["mean_e2el_ms"] == pytest.approx(700.0)
    assert result["cached_token_ratio"] == 0.25 and result["total_cached_tokens"] == 50
    assert result["max_concurrent_requests"] == 2 and result["max_output_tokens_per_s"] == pytest.approx(11.0)


def test_cache_keys_are_null_when_the_server_reports_nothing():
    result = compute_metrics([_output(0.1, 0.2, 2)], 1.0, MetricOptions(), start=0.0)
    assert result["cached_token_ratio"] is None and result["total_cached_tokens"] is None
    assert result["request_goodput"] is None


def test_goodput_counts_requests_meeting_every_slo():
    outputs = [_output(0.1, 1.1, 11), _output(0.1, 3.0, 11), _output(0.5, 0.6, 2), RequestOutput(error="x")]
    assert count_good(outputs, (("ttft", 200.0),)) == 2
    assert count_good(outputs, (("ttft", 200.0), ("e2el", 2000.0))) == 1
    assert count_good(outputs, (("tpot", 150.0),)) == 2


def test_option_parsing_rejects_unknown_names():
    with pytest.raises(ValueError):
        parse_goodput(["latency:5"])
    with pytest.raises(ValueError):
        parse_goodput(["ttft"])
    with pytest.raises(ValueError):
        parse_metric_options("ttft,foo", "99", None)
    options = parse_metric_options(None, "50,99.9", ["e2el:1000"])
    assert options.percentile_metrics == ("ttft", "tpot", "itl") and options.percentiles == (50.0, 99.9)


def test_result_block_has_vllm_lines_and_ours():
    result = compute_metrics([_output(0.1, 1.1, 11, cached=64)], 2.0, MetricOptions(percentiles=(99.9,)), 0.0)
    result.update(server_keys(None, None), max_concurrency=2, request_rate="inf")
    text = result_block(result, MetricOptions(percentiles=(99.9,)))
    assert " Serving Benchmark Result " in text and "Maximum request concurrency:             2" in text
    assert "Request rate configured" not in text
    assert "P99.9 TTFT (ms):" in text and "Median TPOT (ms):" in text and "E2EL" not in text
    assert "Cached-token ratio:                      0.640" in text and "KV bytes fetched:" in text


PROM_BEFORE = """# HELP cachegen_stream_fetch_bytes_total bytes
cachegen_stream_fetch_bytes_total 100.0
cachegen_stream_chunks_total{level="1"} 2.0
vllm:prompt_tokens_total 5.0
"""
PROM_AFTER = """cachegen_stream_fetch_bytes_total 1100.0
cachegen_stream_chunks_total{level="1"} 5.0
cachegen_stream_chunks_total{level="3"} 4.0
cachegen_stream_fallback_chunks_total 2.0
cachegen_stream_fetch_seconds_bucket{le="0.1"} 9.0
"""


def test_prometheus_counters_are_diffed():
    before, after = parse_prometheus(PROM_BEFORE), parse_prometheus(PROM_AFTER)
    assert ("vllm:prompt_tokens_total", ()) not in before
    assert after[("cachegen_stream_chunks_total", (("level", "3"),))] == 4.0
    keys = server_keys(before, after)
    assert keys == {
        "cachegen_bytes_fetched": 1000,
        "cachegen_level_mix": {"1": 3, "3": 4},
        "cachegen_fallback_chunks": 2,
    }
    assert server_keys(None, None) == dict.fromkeys(keys)


def test_compare_table_ratios_and_direction():
    a = {"request_throughput": 0.5, "median_ttft_ms": 3000.0, "completed": 16, "cached_token_ratio": None}
    b = {"request_throughput": 2.5, "median_ttft_ms": 300.0, "completed": 16, "cached_token_ratio": 0.7}
    rows = {row.label: row for row in compare_rows(a, b)}
    assert rows["Request throughput (req/s)"].ratio == 5.0
    assert rows["Median TTFT (ms)"].ratio == pytest.approx(0.1)
    assert rows["Cached-token ratio"].ratio is None
    table = format_table(list(rows.values()), ("off", "on"))
    assert "5.00x better" in table and "0.10x better" in table and "Mean TTFT" not in table
    assert Row("x", 2.0, 1.0, True).ratio == 0.5
