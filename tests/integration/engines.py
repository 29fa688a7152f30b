"""Real vLLM OpenAI servers with the cachegen connector, started as separate processes for tests.

Each engine is a fresh process: nothing but the store connects two of them. An engine started inside a shaped
network namespace (`bench.netshape`) serves HTTP on a Unix socket, which the test reaches from outside the namespace
without crossing the shaped link.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.netshape import NetnsLink
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
    uds: str | None = None
    """The Unix socket it serves HTTP on (an engine inside a network namespace), else None."""

    def client(self, timeout_s: float = 300) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=self.uds) if self.uds else None
        return httpx.Client(base_url=self.base_url, transport=transport, timeout=timeout_s)

    def complete(self, prompt: list[int], max_tokens: int = 32, **extra: object) -> dict:
        body = {"model": self.model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, **extra}
        with self.client() as client:
            response = client.post("/v1/completions", json=body)
        response.raise_for_status()
        return response.json()

    def is_healthy(self) -> bool:
        try:
            with self.client(timeout_s=2) as client:
                return client.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        stop_process(self.process)


def start_engine(settings: Settings, model_dir: Path, log_path: Path, *, prefix_caching: bool = False,
                 netns: NetnsLink | None = None) -> EngineServer:  # fmt: skip
    """Start an engine process; call `wait_ready` before use (start several, then wait, to overlap start-ups).

    ``netns``: run it inside that namespace (its store traffic then crosses the namespace's shaped ``lo``)."""
    port = free_port()
    settings = settings.model_copy(update={"server": settings.server.model_copy(update={"port": port})})
    argv = api_server_argv(settings, model_dir, is_prefix_caching=prefix_caching)
    env = engine_env(os.environ, settings)
    uds = None
    if netns is not None:
        uds = str(log_path.with_suffix(".sock"))
        argv = netns.exec_argv([*argv, "--uds", uds])
        env["VLLM_HOST_IP"] = "127.0.0.1"  # no route off loopback in there: vLLM's own address guess would fail
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    base_url = "http://engine" if uds else f"http://127.0.0.1:{port}"
    return EngineServer(process, base_url, model_dir.name, log_path, uds)


def wait_ready(engine: EngineServer) -> EngineServer:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if engine.process.poll() is not None:
            raise RuntimeError(
                f"engine exited with {engine.process.returncode}:\n{engine.log_path.read_text()[-4000:]}"
            )
        if engine.is_healthy():
            return engine
        time.sleep(1)
    engine.stop()
    raise RuntimeError(f"engine not healthy after {STARTUP_TIMEOUT_S} s:\n{engine.log_path.read_text()[-4000:]}")
