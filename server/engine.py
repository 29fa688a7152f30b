"""How cachegen starts vLLM: environment, engine arguments and the connector config, from one ``Settings``.

Facts behind the defaults (measured on 2-core CPU machines, see DESIGN.md §3): vLLM would take 92% of RAM for
its KV pool unless told; binding OpenMP to every core halves prefill; the venv's ``libiomp5.so`` must be
preloaded; eager mode starts in ~14 s while compiled mode recompiles on every start.

Metrics across processes: vLLM runs the scheduler and the workers (where the connector counts chunks and bytes) in
child processes, so ``cachegen serve`` puts prometheus_client in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``):
every process writes its samples to files in one directory, and the API's ``/metrics`` reads them all.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cachegen.config import Settings

CONNECTOR_CLASS = "CacheGenConnector"
CONNECTOR_MODULE = "cachegen.connector.vllm_v1"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client when it is first imported


def has_cuda_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def server_metrics_dir(settings: Settings, pid: int) -> Path:
    """The Prometheus multiprocess directory of the `cachegen serve` process ``pid`` (the re-exec keeps the pid)."""
    return settings.home / "metrics" / f"serve-{pid}"


def engine_env(base: Mapping[str, str], settings: Settings, *, metrics_dir: Path | None = None) -> dict[str, str]:
    """Environment for a vLLM process on this machine (CPU settings are harmless on GPU machines).

    With ``metrics_dir``, prometheus_client runs in multiprocess mode there: the directory is created and its
    stale ``*.db`` files (from an earlier process with the same pid) removed. A ``PROMETHEUS_MULTIPROC_DIR``
    already in ``base`` wins; it is created if missing and otherwise left alone (whoever set it owns it).
    """
    env = dict(base)
    if metrics_dir is not None:
        if base.get(METRICS_DIR_ENV):
            Path(base[METRICS_DIR_ENV]).mkdir(parents=True, exist_ok=True)
        else:
            metrics_dir.mkdir(parents=True, exist_ok=True)
            for stale in metrics_dir.glob("*.db"):
                stale.unlink(missing_ok=True)
            env[METRICS_DIR_ENV] = str(metrics_dir)
    if not has_cuda_gpu():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, settings.server.kv_cache_bytes >> 30)))
        cores = sorted(os.sched_getaffinity(0))
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0]))
        iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
        if iomp.exists() and "libiomp5" not in env.get("LD_PRELOAD", ""):
            env["LD_PRELOAD"] = ":".join(p for p in (str(iomp), env.get("LD_PRELOAD", "")) if p)
    env.setdefault("VLLM_LOGGING_LEVEL", settings.log.level)
    return env


def connector_config(settings: Settings) -> dict[str, Any]:
    """vLLM's ``kv_transfer_config`` naming our connector, with the settings sections it reads."""
    return {
        "kv_connector": CONNECTOR_CLASS,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_both",
        # A chunk that cannot be loaded (missing, corrupt, store down) is recomputed, never fatal.
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "home": str(settings.home),
            "store": {"url": settings.store.resolved_url(settings.store_url()), "capacity_bytes": settings.store.capacity_bytes},
            "codec": settings.codec.model_dump(),
            "stream": settings.stream.model_dump(),
        },
    }


def llm_kwargs(settings: Settings, model_dir: Path, *, is_connector: bool, is_prefix_caching: bool) -> dict:
    """Keyword arguments of ``vllm.LLM`` (offline engine) for benchmarks and tests."""
    kwargs: dict[str, Any] = {
        "model": str(model_dir),
        "max_model_len": settings.server.max_model_len,
        "enforce_eager": settings.server.is_eager,
        "enable_prefix_caching": is_prefix_caching,
        "max_num_batched_tokens": settings.server.max_model_len,
    }
    if has_cuda_gpu():
        kwargs["kv_cache_memory_bytes"] = settings.server.kv_cache_bytes
    if is_connector:
        kwargs["kv_transfer_config"] = connector_config(settings)
    return kwargs


def api_server_argv(settings: Settings, model_dir: Path, *, is_prefix_caching: bool = True) -> list[str]:
    """Command line of vLLM's own OpenAI-compatible server with the cachegen connector."""
    server = settings.server
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--served-model-name", server.served_model_name or model_dir.name,
        "--host", server.host, "--port", str(server.port),
        "--max-model-len", str(server.max_model_len),
        "--max-num-batched-tokens", str(server.max_model_len),
        "--kv-transfer-config", json.dumps(connector_config(settings)),
        "--enable-prompt-tokens-details",
        "--enable-prefix-caching" if is_prefix_caching else "--no-enable-prefix-caching",
    ]
    if server.is_eager:
        argv.append("--enforce-eager")
    if has_cuda_gpu():
        argv += ["--kv-cache-memory-bytes", str(server.kv_cache_bytes)]
    return argv
