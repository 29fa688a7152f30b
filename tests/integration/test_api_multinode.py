"""Two nodes and a store, all separate processes: the gRPC store service, node A and node B (`cachegen serve
--store grpc://...`). A context registered through A is answered by B from the store: same greedy answer,
cached tokens reported. A store that goes down never fails a request."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.api_servers import ApiNode, cached_tokens, start_node, wait_node
from tests.integration.store_fixtures import TOKENS, StoreServer, start_store
from tests.integration.test_api_server import corpus_text

pytestmark = pytest.mark.engine

QUESTION = "\n\nQuestion: In one sentence, what is the text above about?\nAnswer:"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> tuple[StoreServer, ApiNode, ApiNode]:
    work = tmp_path_factory.mktemp("multinode")
    store = start_store(work / "store", f"disk://{work / 'kv'}?fsync=0")
    # Both nodes share the context records directory (as nodes on one shared filesystem would), so B also
    # resolves A's context ids; their KV reaches B only through the gRPC store. vLLM's in-memory prefix cache is
    # off on both, so A and B prefill exactly the same suffix after the same stored chunks: in bf16 a different
    # recompute boundary alone can flip a near-tie greedy token (DESIGN.md §3, exactness).
    shared = {"store": {"token": TOKENS["alice"]}, "contexts_dir": str(work / "contexts"), "is_prefix_caching": False}
    nodes = [start_node(work / name, name, f"grpc://{store.address}", **shared) for name in ("a", "b")]
    try:
        yield store, *(wait_node(node) for node in nodes)
    finally:
        for node in nodes:
            node.stop()
        store.stop()


def test_context_registered_on_a_is_answered_by_b(cluster):
    _, node_a, node_b = cluster
    http_a = httpx.Client(base_url=node_a.base_url, headers={"authorization": f"Bearer {node_a.sdk().api_key}"},
                          timeout=600)  # fmt: skip
    context = http_a.post("/v1/contexts", json={"model": node_a.model, "text": corpus_text(60000, 9000)}).json()
    assert context["state"] == "ACTIVE", context
    num_chunks = context["progress"]["total_chunks"]
    ask = {"model": node_a.model, "prompt": QUESTION, "max_tokens": 24, "temperature": 0,
           "extra_body": {"cached_context": context["id"], "cachegen": {"save": False}}}  # fmt: skip
    answer_a = node_a.sdk().completions.create(**ask)
    answer_b = node_b.sdk().completions.create(**ask)
    assert answer_b.choices[0].text == answer_a.choices[0].text
    assert cached_tokens(answer_a.usage) == cached_tokens(answer_b.usage) == num_chunks * 256
    # Another tenant on B gets nothing from A's context (and cannot name it).
    plain = {**ask, "extra_body": {}}
    plain["prompt"] = corpus_text(60000, 9000) + QUESTION
    assert cached_tokens(node_b.sdk("bob").completions.create(**plain).usage) == 0


def test_slo_knobs_are_accepted(cluster):
    _, _, node_b = cluster
    answer = node_b.sdk().completions.create(
        model=node_b.model, prompt=corpus_text(90000, 3000), max_tokens=4,
        extra_body={"cachegen": {"slo_ms": 2000, "min_quality": 1}},
    )  # fmt: skip
    assert answer.usage.completion_tokens == 4


def test_store_down_still_answers(cluster):
    store, node_a, node_b = cluster
    prompt = corpus_text(100000, 4000) + QUESTION
    store.kill()
    for node in (node_a, node_b):
        answer = node.sdk().completions.create(model=node.model, prompt=prompt, max_tokens=8, temperature=0)
        assert answer.usage.completion_tokens == 8 and cached_tokens(answer.usage) == 0
        assert httpx.get(f"{node.base_url}/health").status_code == 200
