"""`cachegen serve` processes for the API tests: each node is a real server process (FastAPI + vLLM in-process),
configured by a YAML file plus flags, the way an operator runs it."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import yaml

from tests.integration.engines import free_port, stop_process

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 600
API_KEYS = {"alice": "sk-alice-000000001", "bob": "sk-bob-0000000002", "carol": "sk-carol-00000003",
            "dave": "sk-dave-000000004"}  # fmt: skip
TOKENS_PER_CHUNK = 256  # the default chunk size the node's connector keys the store with


@dataclass
class ApiNode:
    process: subprocess.Popen
    base_url: str
    log_path: Path
    model: str = "SmolLM2-135M-Instruct"
    # What the node answered while its HTTP server was up but the engine was still starting (`probe_starting`).
    starting: dict[str, httpx.Response] = field(default_factory=dict)

    def sdk(self, tenant: str = "alice") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=API_KEYS[tenant], max_retries=0, timeout=600)

    def http(self, tenant: str = "alice") -> httpx.Client:
        headers = {"authorization": f"Bearer {API_KEYS[tenant]}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=600)

    def stop(self) -> None:
        stop_process(self.process)


def start_node(work: Path, name: str, store_url: str, **settings: object) -> ApiNode:
    """Start `cachegen serve` with keys for alice and bob; call `wait_node` before use (start several, then wait)."""
    work.mkdir(parents=True, exist_ok=True)
    keys = work / f"{name}.keys"
    keys.write_text("".join(f"{tenant} {key}\n" for tenant, key in API_KEYS.items()))
    store = settings.pop("store", {})
    server = {"contexts_dir": str(work / "contexts"), "context_sweep_s": 0.5, **settings}
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"server": server, "store": {"url": store_url, **store}}))
    port = free_port()
    ready = work / f"{name}.ready"
    log_path = work / f"{name}.log"
    cmd = [sys.executable, "-m", "server.cli", "serve", "--config", str(config), "--port", str(port),
           "--api-keys-file", str(keys), "--ready-file", str(ready)]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    return ApiNode(process, f"http://127.0.0.1:{port}", log_path)


def probe_starting(node: ApiNode) -> ApiNode:
    """Once the node's HTTP server answers, and before its engine is ready (vLLM takes ~20-40 s more), record
    its answers to ``/health`` and to a completion in ``node.starting``."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while node.process.poll() is None and time.monotonic() < deadline:
        try:
            with node.http() as http:
                node.starting["health"] = http.get("/health", timeout=5)
                body = {"model": node.model, "prompt": "hi", "max_tokens": 1}
                node.starting["completion"] = http.post("/v1/completions", json=body, timeout=5)
            return node
        except httpx.TransportError:  # not listening yet
            time.sleep(0.2)
    return node


def wait_node(node: ApiNode) -> ApiNode:
    ready = node.log_path.with_suffix(".ready")
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not ready.exists():
        if node.process.poll() is not None or time.monotonic() > deadline:
            node.stop()
            raise RuntimeError(f"node did not start:\n{node.log_path.read_text()[-4000:]}")
        time.sleep(0.5)
    return node


def cached_tokens(usage) -> int:
    return usage.prompt_tokens_details.cached_tokens


def num_chunks_stored(store_dir: Path, token_ids: list[int], tenant: str) -> int:
    """How many of the full chunks of ``token_ids`` (keyed for ``tenant``) a node's ``disk://`` store holds."""
    from cachegen.config import Settings
    from cachegen.model import ensure_model, kv_layout, model_fingerprint
    from cachegen.spec import chunk_keys
    from cachegen.store import open_store

    model_dir = ensure_model(Settings.from_env().home)
    layout = kv_layout(model_dir, "bfloat16", TOKENS_PER_CHUNK)
    keys = chunk_keys(token_ids, layout, model_fingerprint(model_dir, layout), tenant)
    return len(open_store(f"disk://{store_dir}").lookup(keys))


def wait_until(predicate, timeout_s: float = 30.0) -> bool:
    """Poll ``predicate`` every 0.1 s until it holds (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
