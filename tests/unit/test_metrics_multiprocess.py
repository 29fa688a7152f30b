"""Counters incremented in other processes (vLLM's engine core and workers, where the connector counts) reach the
API's ``/metrics`` through prometheus_client's multiprocess mode, and `cachegen bench serve` reads them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client import REGISTRY, generate_latest

from bench.serve_report import parse_prometheus, server_keys
from cachegen import obs
from cachegen.config import Settings
from server.engine import METRICS_DIR_ENV, engine_env, server_metrics_dir

REPO = Path(__file__).resolve().parents[2]

# What a worker process does in cachegen.connector.worker._count, and the API process per request.
_WORKER = """
from cachegen import obs
obs.CONNECTOR_LOADED_CHUNKS.labels(level="1").inc(2)
obs.CONNECTOR_FETCHED_BYTES.labels(level="1").inc(1000)
obs.CONNECTOR_FALLBACK_CHUNKS.labels(reason="fetch").inc()
"""
_API = """
from cachegen import obs
obs.API_TTFT_SECONDS.labels(endpoint="completions").observe(0.3)
obs.CONNECTOR_LOADED_CHUNKS.labels(level="3").inc()
"""


def _run_in_process(code: str, metrics_dir: Path) -> None:
    env = {**os.environ, METRICS_DIR_ENV: str(metrics_dir)}
    subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, check=True, timeout=60)


def test_engine_env_names_a_clean_metrics_dir_unless_one_is_given(tmp_path):
    settings = Settings.from_env(home=tmp_path)
    ours = server_metrics_dir(settings, 4242)
    assert ours == tmp_path / "metrics" / "serve-4242"
    assert METRICS_DIR_ENV not in engine_env({}, settings)  # vLLM's own server keeps its own handling
    ours.mkdir(parents=True)
    (ours / "counter_4242.db").write_bytes(b"stale")
    (ours / "notes.txt").write_text("kept")
    env = engine_env({}, settings, metrics_dir=ours)
    assert env[METRICS_DIR_ENV] == str(ours)
    assert sorted(p.name for p in ours.iterdir()) == ["notes.txt"]

    theirs = tmp_path / "theirs"
    env = engine_env({METRICS_DIR_ENV: str(theirs)}, settings, metrics_dir=tmp_path / "unused")
    assert env[METRICS_DIR_ENV] == str(theirs) and theirs.is_dir() and not (tmp_path / "unused").exists()
    (theirs / "counter_1.db").write_bytes(b"theirs")
    engine_env({METRICS_DIR_ENV: str(theirs)}, settings, metrics_dir=ours)
    assert (theirs / "counter_1.db").exists()  # whoever named the directory owns its files


def test_counters_of_other_processes_are_summed_and_scraped(tmp_path):
    assert obs.metrics_registry() is REGISTRY
    _run_in_process(_WORKER, tmp_path)
    _run_in_process(_WORKER, tmp_path)  # a second worker (or a restarted one): counters add up
    _run_in_process(_API, tmp_path)
    text = generate_latest(obs.metrics_registry(tmp_path)).decode()
    samples = parse_prometheus(text)
    assert samples[("cachegen_connector_loaded_chunks_total", (("level", "1"),))] == 4.0
    assert samples[("cachegen_connector_loaded_chunks_total", (("level", "3"),))] == 1.0
    assert samples[("cachegen_connector_fetched_bytes_total", (("level", "1"),))] == 2000.0
    assert samples[("cachegen_connector_fallback_chunks_total", (("reason", "fetch"),))] == 2.0
    assert samples[("cachegen_api_ttft_seconds_count", (("endpoint", "completions"),))] == 1.0
    assert "process_resident_memory_bytes" in text and "python_info" in text  # of the process that serves
    assert server_keys(None, samples) == {
        "cachegen_bytes_fetched": 2000,
        "cachegen_level_mix": {"1": 4, "3": 1},
        "cachegen_fallback_chunks": 2,
    }
