"""Real vLLM OpenAI servers with the cachegen connector, started as separate processes for tests.

Each engine is a fresh process: nothing but the store connects two of them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from cachegen.config import Settings
from server.engine import api_server_argv, engine_env

STARTUP_TIMEOUT_S = 420


def stop_process(process: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within ``timeout_s``."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class EngineServer:
    """A running `vllm.entrypoints.openai.api_server` process and how to reach it."""

    process: subprocess.Popen
    base_url: str
    model_name: str
    log_path: Path

    def complete(self, prompt: list[int], max_tokens: int = 32, **extra: object) -> dict:
        body = {"model": self.model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, **extra}
        response = httpx.post(f"{self.base_url}/v1/completions", json=body, timeout=300)
        response.raise_for_status()
        return response.json()

    def stop(self) -> None:
        stop_process(self.process)


def start_engine(settings: Settings, model_dir: Path, log_path: Path, *, prefix_caching: bool = False) -> EngineServer:
    """Start an engine process; call `wait_ready` before use (start several, then wait, to overlap start-ups)."""
    port = free_port()
    settings = settings.model_copy(update={"server": settings.server.model_copy(update={"port": port})})
    argv = api_server_argv(settings, model_dir, is_prefix_caching=prefix_caching)
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(argv, env=engine_env(os.environ, settings), stdout=log, stderr=subprocess.STDOUT)
    return EngineServer(process, f"http://127.0.0.1:{port}", model_dir.name, log_path)


def wait_ready(engine: EngineServer) -> EngineServer:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if engine.process.poll() is not None:
            raise RuntimeError(
                f"engine exited with {engine.process.returncode}:\n{engine.log_path.read_text()[-4000:]}"
            )
        try:
            if httpx.get(f"{engine.base_url}/health", timeout=2).status_code == 200:
                return engine
        except httpx.HTTPError:
            pass
        time.sleep(1)
    engine.stop()
    raise RuntimeError(f"engine not healthy after {STARTUP_TIMEOUT_S} s:\n{engine.log_path.read_text()[-4000:]}")
