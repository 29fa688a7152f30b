"""`cachegen bench serve` against a real vLLM OpenAI server with the cachegen connector (one engine per module).

Small counts and short outputs: this runs on 2 CPU cores. Every dataset, both pacing modes (Poisson rate and a
concurrency cap), both endpoints, the saved JSON keys, failed requests counted, and `bench compare`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cachegen.config import Settings
from server.cli import main
from tests.integration.engines import EngineServer, start_engine, wait_ready

pytestmark = pytest.mark.engine

VLLM_KEYS = (
    "date",
    "backend",
    "model_id",
    "tokenizer_id",
    "num_prompts",
    "request_rate",
    "burstiness",
    "max_concurrency",
    "duration",
    "completed",
    "failed",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "request_goodput",
    "output_throughput",
    "total_token_throughput",
    "max_output_tokens_per_s",
    "max_concurrent_requests",
    *(f"{stat}_{name}_ms" for stat in ("mean", "median", "std", "p99") for name in ("ttft", "tpot", "itl", "e2el")),
)
OUR_KEYS = (
    "bench",
    "git_sha",
    "device",
    "settings_digest",
    "cached_token_ratio",
    "total_cached_tokens",
    "cachegen_bytes_fetched",
    "cachegen_level_mix",
    "cachegen_fallback_chunks",
    "error_samples",
)


@pytest.fixture(scope="module")
def engine(model_dir: Path, tmp_path_factory) -> EngineServer:
    settings = Settings.from_env(store={"url": f"disk://{tmp_path_factory.mktemp('kvstore')}"})
    server = start_engine(settings, model_dir, tmp_path_factory.mktemp("logs") / "engine.log", prefix_caching=True)
    try:
        yield wait_ready(server)
    finally:
        server.stop()


def _bench(engine: EngineServer, tmp_path: Path, name: str, *flags: str) -> tuple[int, dict]:
    argv = [
        "bench",
        "serve",
        "--base-url",
        engine.base_url,
        "--disable-tqdm",
        "--save-result",
        "--result-dir",
        str(tmp_path),
        "--result-filename",
        f"{name}.json",
        *flags,
    ]
    code = main(argv)
    return code, json.loads((tmp_path / f"{name}.json").read_text())


def test_random_poisson_rate_saves_vllm_and_our_keys(engine, model_dir, tmp_path, capsys):
    code, result = _bench(
        engine,
        tmp_path,
        "random",
        "--dataset-name",
        "random",
        "--num-prompts",
        "10",
        "--random-input-len",
        "64",
        "--random-output-len",
        "8",
        "--ignore-eos",
        "--request-rate",
        "4",
        "--seed",
        "1",
        "--tokenizer",
        str(model_dir),
        "--goodput",
        "e2el:600000",
        "--plot",
        str(tmp_path / "plots"),
    )
    assert code == 0
    missing = [key for key in VLLM_KEYS + OUR_KEYS if key not in result]
    assert not missing
    assert (result["completed"], result["failed"], result["request_rate"]) == (10, 0, 4.0)
    assert result["total_output_tokens"] == 80  # ignore_eos: exactly max_tokens each
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    assert result["mean_ttft_ms"] > 0 and result["mean_tpot_ms"] > 0 and result["mean_itl_ms"] > 0
    assert result["model_id"] == engine.model_name and result["bench"] == "serve"
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["openai-throughput.png", "openai-ttft-cdf.png"]
    printed = capsys.readouterr().out
    assert "============ Serving Benchmark Result ============" in printed
    assert "Request rate configured (RPS):           4.00" in printed
    assert json.loads(printed.strip().splitlines()[-2])["git_sha"] == result["git_sha"]  # the one JSON line


def test_long_doc_qa_with_concurrency_cap_reuses_contexts(engine, tmp_path):
    code, result = _bench(
        engine,
        tmp_path,
        "ldqa",
        "--dataset-name",
        "long-doc-qa",
        "--num-prompts",
        "6",
        "--context-tokens",
        "1024",
        "--questions-per-doc",
        "3",
        "--output-len",
        "4",
        "--max-concurrency",
        "2",
        "--percentile-metrics",
        "ttft,e2el",
        "--metric-percentiles",
        "50,90",
    )
    assert code == 0
    assert (result["completed"], result["failed"], result["max_concurrency"]) == (6, 0, 2)
    assert result["total_input_tokens"] > 6 * 700
    # 2 documents x 3 questions: the 4 later questions find their document's context cached.
    assert result["cached_token_ratio"] > 0.4
    assert "p90_ttft_ms" in result and "p50_e2el_ms" in result


def test_multi_round_chat_grows_each_session(engine, tmp_path):
    code, result = _bench(
        engine,
        tmp_path,
        "chat",
        "--dataset-name",
        "multi-round",
        "--num-prompts",
        "6",
        "--num-turns",
        "3",
        "--context-tokens",
        "400",
        "--output-len",
        "6",
        "--endpoint",
        "/v1/chat/completions",
        "--max-concurrency",
        "2",
        "--save-detailed",
    )
    assert code == 0 and result["completed"] == 6 and result["backend"] == "openai-chat"
    lens = result["input_lens"]  # order: turn 1 of both sessions, then turn 2, then turn 3
    assert lens[2] > lens[0] and lens[3] > lens[1] and lens[4] > lens[2] and lens[5] > lens[3]
    assert all(text for text in result["generated_texts"])
    assert result["cached_token_ratio"] > 0.3  # later turns reuse the history


def test_failed_requests_are_counted_not_dropped(engine, tmp_path, capsys):
    too_long = " ".join(["word"] * 12000)  # > max_model_len (8192) tokens: the server refuses it
    prompts = [{"prompt": "The capital of France is"}, {"prompt": too_long}, {"prompt": "One, two, three,"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in prompts) + "\n")
    code, result = _bench(
        engine,
        tmp_path,
        "custom",
        "--dataset-name",
        "custom",
        "--dataset-path",
        str(path),
        "--num-prompts",
        "3",
        "--output-len",
        "4",
        "--save-detailed",
    )
    assert code == 0 and (result["completed"], result["failed"]) == (2, 1)
    assert result["errors"][1].startswith("HTTP 400") and result["errors"][0] == ""
    assert result["output_lens"][1] == 0
    assert "Failed requests:                         1" in capsys.readouterr().out

    code, bad = _bench(
        engine,
        tmp_path,
        "bad-model",
        "--model",
        "no-such-model",
        "--num-prompts",
        "4",
        "--random-input-len",
        "16",
        "--random-output-len",
        "2",
    )
    assert code == 1 and (bad["completed"], bad["failed"]) == (0, 4)
    assert "HTTP 404" in bad["error_samples"][0]


def test_extra_body_reaches_the_server_and_compare_reads_both(engine, tmp_path, capsys):
    # A field the server validates proves the merge: an invalid max_tokens makes every request fail.
    code, broken = _bench(
        engine,
        tmp_path,
        "broken",
        "--num-prompts",
        "2",
        "--random-input-len",
        "16",
        "--extra-body",
        '{"max_tokens": -5}',
    )
    assert code == 1 and broken["failed"] == 2
    switches = '{"kv_transfer_params": {"cachegen": {"load": false, "save": false}}}'
    code, fine = _bench(
        engine,
        tmp_path,
        "fine",
        "--num-prompts",
        "2",
        "--random-input-len",
        "16",
        "--random-output-len",
        "2",
        "--extra-body",
        switches,
    )
    assert code == 0 and fine["completed"] == 2
    capsys.readouterr()
    assert (
        main(["bench", "compare", str(tmp_path / "broken.json"), str(tmp_path / "fine.json"), "--names", "broken,fine"])
        == 0
    )
    table = capsys.readouterr().out
    assert "Successful requests" in table and "broken" in table and "Median TTFT (ms)" in table
