"""Run: .venv/bin/python -m tests.integration.measure_api_ttft /tmp/ttft-run

TTFT on node B for an ~8K-token context: recompute vs the context's KV fetched from the gRPC store.

Store + node A + node B as separate processes (like tests/integration/test_api_multinode.py). B runs with vLLM's
in-memory prefix cache off, so every 'with' request loads from the store and every 'without' recomputes.
"""

import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

from tests.integration.api_servers import API_KEYS, start_node, wait_node
from tests.integration.store_fixtures import TOKENS, start_store
from tests.integration.test_api_server import corpus_text


def main() -> None:
    work = Path(sys.argv[1])
    work.mkdir(parents=True, exist_ok=True)
    store = start_store(work / "store", f"disk://{work / 'kv'}?fsync=0")
    shared = {"store": {"token": TOKENS["alice"]}, "contexts_dir": str(work / "contexts")}
    a = start_node(work / "a", "a", f"grpc://{store.address}", **shared)
    b = start_node(work / "b", "b", f"grpc://{store.address}", is_prefix_caching=False, **shared)
    try:
        wait_node(a)
        wait_node(b)
        hdr = {"authorization": f"Bearer {API_KEYS['alice']}"}
        text = corpus_text(0, 33400)
        t = time.perf_counter()
        ctx = httpx.post(
            f"{a.base_url}/v1/contexts", json={"model": a.model, "text": text}, headers=hdr, timeout=900
        ).json()
        print("register on A:", round(time.perf_counter() - t, 2), "s", ctx["usage"], ctx["progress"], flush=True)

        def ttft(body):
            t0 = time.perf_counter()
            with httpx.stream(
                "POST",
                f"{b.base_url}/v1/completions",
                json={**body, "stream": True, "stream_options": {"include_usage": True}},
                headers=hdr,
                timeout=900,
            ) as r:
                r.raise_for_status()
                first, text, usage = None, "", None
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    if first is None and ev.get("choices"):
                        first = time.perf_counter() - t0
                    if ev.get("choices"):
                        text += ev["choices"][0]["text"]
                    if ev.get("usage"):
                        usage = ev["usage"]
            return first, text, usage

        q = "\n\nQuestion: In one sentence, what is the text above about?\nAnswer:"
        base = {"model": b.model, "max_tokens": 8, "temperature": 0}
        rows = {"without": [], "with": []}
        for i in range(3):
            f, txt_wo, u = ttft({**base, "prompt": text + q, "cachegen": {"load": False, "save": False}})
            rows["without"].append(f)
            print("without", round(f, 3), u["prompt_tokens"], u["prompt_tokens_details"], flush=True)
            f, txt_w, u = ttft({**base, "prompt": q, "cached_context": ctx["id"]})
            rows["with"].append(f)
            print("with   ", round(f, 3), u["prompt_tokens"], u["prompt_tokens_details"], flush=True)
            print("identical:", txt_w == txt_wo, repr(txt_w[:60]), flush=True)
        print(json.dumps({k: {"median_s": statistics.median(v), "all": v} for k, v in rows.items()}), flush=True)
        print("loadavg", os.getloadavg())
    finally:
        a.stop()
        b.stop()
        store.stop()


if __name__ == "__main__":
    main()
