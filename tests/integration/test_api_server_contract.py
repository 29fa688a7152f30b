"""The HTTP API's contract on the shared real node (`cachegen serve`: FastAPI + vLLM + the connector, disk store),
through the official openai SDK and raw HTTP: usage and cached tokens, streaming, API keys and tenants, body and
context limits, OpenAI-shaped errors, 503 while the engine starts, request ids and metrics, the ``cachegen``
options, and the contexts API. Tests here use the tenants carol and dave (test_api_server.py uses alice and bob)
and their own slices of text, so the two modules never see each other's caches or contexts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.api_servers import TOKENS_PER_CHUNK, ApiNode, cached_tokens, num_chunks_stored, wait_until
from tests.integration.test_api_server import corpus_text

pytestmark = pytest.mark.engine


def prose(index: int) -> str:
    """A slice of real prose no other test uses: 2000 characters, ~450-550 tokens (one full chunk)."""
    return corpus_text(80000 + 3000 * index, 2000)


def _ids(tokenizer, text: str, *, is_start: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=is_start)["input_ids"])


def test_completion_reports_cached_tokens_on_repeat(api_node: ApiNode, tokenizer):
    sdk, prompt = api_node.sdk("carol"), prose(0)
    first = sdk.completions.create(model=api_node.model, prompt=prompt, max_tokens=4, temperature=0)
    second = sdk.completions.create(model=api_node.model, prompt=prompt, max_tokens=4, temperature=0)
    assert first.choices[0].text and first.choices[0].finish_reason == "length"
    assert first.usage.prompt_tokens == len(_ids(tokenizer, prompt)) and first.usage.completion_tokens == 4
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    assert cached_tokens(first.usage) == 0
    assert second.usage.prompt_tokens == first.usage.prompt_tokens
    assert 0 < cached_tokens(second.usage) < second.usage.prompt_tokens


def test_chat_streams_with_usage(api_node: ApiNode):
    sdk, messages = api_node.sdk("carol"), [{"role": "user", "content": prose(1)}]
    first = sdk.chat.completions.create(model=api_node.model, messages=messages, max_tokens=4, temperature=0)
    chunks = list(sdk.chat.completions.create(model=api_node.model, messages=messages, max_tokens=4, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    last = chunks[-1]
    assert last.choices == [] and 1 <= last.usage.completion_tokens <= 4
    assert last.usage.prompt_tokens == first.usage.prompt_tokens and cached_tokens(last.usage) > 0


def test_streamed_completion_without_usage(api_node: ApiNode):
    sdk, prompt = api_node.sdk("carol"), "Once upon a time, in a small village,"
    whole = sdk.completions.create(model=api_node.model, prompt=prompt, max_tokens=6, temperature=0)
    chunks = list(sdk.completions.create(model=api_node.model, prompt=prompt, max_tokens=6, temperature=0,
                                         stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text != ""  # greedy: same text
    assert all(c.usage is None for c in chunks)


def test_tenants_never_share_cached_tokens(api_node: ApiNode):
    carol, dave, prompt = api_node.sdk("carol"), api_node.sdk("dave"), prose(2)
    assert cached_tokens(carol.completions.create(model=api_node.model, prompt=prompt, max_tokens=1).usage) == 0
    assert cached_tokens(dave.completions.create(model=api_node.model, prompt=prompt, max_tokens=1).usage) == 0
    assert cached_tokens(carol.completions.create(model=api_node.model, prompt=prompt, max_tokens=1).usage) > 0


def test_bad_keys_get_401(api_node: ApiNode):
    stranger = openai.OpenAI(base_url=f"{api_node.base_url}/v1", api_key="sk-wrong-key-9", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        stranger.models.list()
    assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    response = httpx.get(f"{api_node.base_url}/v1/models")  # no key at all
    assert response.status_code == 401 and set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_models(api_node: ApiNode):
    sdk = api_node.sdk("carol")
    assert [m.id for m in sdk.models.list()] == [api_node.model]
    assert sdk.models.retrieve(api_node.model).owned_by == "cachegen"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("gpt-4")


def test_errors_have_openai_shape(api_node: ApiNode):
    sdk, http = api_node.sdk("carol"), api_node.http("carol")
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.completions.create(model="gpt-4", prompt="hi")
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.completions.create(model=api_node.model, prompt="hi", temperature=5)
    assert caught.value.body["param"] == "temperature" and caught.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model=api_node.model, messages=[])
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.completions.create(model=api_node.model, prompt="x", max_tokens=10_000)
    assert caught.value.body["code"] == "context_length_exceeded"
    bad_json = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"
    assert http.get("/v2/nothing").json()["error"]["type"] == "not_found_error"


def test_body_limit_gives_413(api_node: ApiNode):
    http, max_body_bytes = api_node.http("carol"), 1 << 20  # the node's limit
    response = http.post("/v1/completions", json={"model": api_node.model, "prompt": "x" * (max_body_bytes + 1)})
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit applies while the body arrives
        yield f'{{"model": "{api_node.model}", "prompt": "'.encode()
        yield b"x" * (max_body_bytes + 1)
        yield b'"}'

    response = http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_engine_not_ready_gives_503(api_node: ApiNode):
    # Recorded by the fixture while the node's HTTP server was up and vLLM was still starting.
    health, completion = api_node.starting["health"], api_node.starting["completion"]
    assert health.status_code == 503
    assert completion.status_code == 503 and completion.json()["error"]["type"] == "server_error"
    assert httpx.get(f"{api_node.base_url}/health").json() == {"status": "ok"}


def test_request_id_and_metrics(api_node: ApiNode):
    http = api_node.http("carol")
    response = http.post("/v1/completions", json={"model": api_node.model, "prompt": "Hello", "max_tokens": 2},
                         headers={"x-request-id": "abc123"})  # fmt: skip
    assert response.headers["x-request-id"] == "abc123" and response.json()["id"] == "cmpl-abc123"
    metrics = http.get("/metrics").text
    assert "cachegen_api_ttft_seconds_bucket" in metrics and "cachegen_api_cached_tokens_total" in metrics


def test_cachegen_options_reach_the_connector(api_node: ApiNode, api_store_dir: Path, tokenizer):
    sdk, unsaved, saved = api_node.sdk("carol"), prose(3), prose(4)
    options = {"slo_ms": 500, "min_quality": 3, "save": False}
    sdk.completions.create(model=api_node.model, prompt=unsaved, max_tokens=1, extra_body={"cachegen": options})
    sdk.completions.create(model=api_node.model, prompt=saved, max_tokens=1)
    # Saves finish on the connector's saver thread after the response, in request order.
    saved_ids, unsaved_ids = _ids(tokenizer, saved), _ids(tokenizer, unsaved)
    num_saved = len(saved_ids) // TOKENS_PER_CHUNK
    assert wait_until(lambda: num_chunks_stored(api_store_dir, saved_ids, "carol") == num_saved > 0)
    assert num_chunks_stored(api_store_dir, unsaved_ids, "carol") == 0
    with pytest.raises(openai.BadRequestError):
        sdk.completions.create(model=api_node.model, prompt="hi", extra_body={"cachegen": {"slo_ms": -1}})


def test_context_crud_and_reference(api_node: ApiNode, api_store_dir: Path, tokenizer):
    carol, text = api_node.http("carol"), prose(5)
    created = carol.post("/v1/contexts", json={"model": api_node.model, "text": text, "ttl": "600s"})
    assert created.status_code == 200, created.text
    context, ids = created.json(), _ids(tokenizer, text)
    assert context["state"] == "ACTIVE" and context["id"].startswith("ctx_") and text[:10] not in context["id"]
    assert context["usage"]["total_tokens"] == len(ids)
    num_chunks = len(ids) // TOKENS_PER_CHUNK
    assert context["progress"]["stored_chunks"] == context["progress"]["total_chunks"] == num_chunks > 0
    assert num_chunks_stored(api_store_dir, ids, "carol") == num_chunks
    assert carol.get(f"/v1/contexts/{context['id']}").json()["id"] == context["id"]
    assert [c["id"] for c in carol.get("/v1/contexts").json()["data"]] == [context["id"]]

    answer = api_node.sdk("carol").completions.create(model=api_node.model, prompt=" Summary:", max_tokens=2,
                                                      extra_body={"cached_context": context["id"]})  # fmt: skip
    assert answer.usage.prompt_tokens == len(ids) + len(_ids(tokenizer, " Summary:", is_start=False))
    assert cached_tokens(answer.usage) >= TOKENS_PER_CHUNK * num_chunks

    dave = api_node.http("dave")
    assert dave.get(f"/v1/contexts/{context['id']}").status_code == 404
    assert dave.get("/v1/contexts").json()["data"] == []
    with pytest.raises(openai.NotFoundError):
        api_node.sdk("dave").completions.create(model=api_node.model, prompt="x",
                                                extra_body={"cached_context": context["id"]})  # fmt: skip

    patched = carol.patch(f"/v1/contexts/{context['id']}", json={"ttl": 7200}).json()
    assert patched["expire_time"] > context["expire_time"]
    assert carol.delete(f"/v1/contexts/{context['id']}").json()["deleted"] is True
    assert carol.get(f"/v1/contexts/{context['id']}").status_code == 404
    assert num_chunks_stored(api_store_dir, ids, "carol") == 0


def _chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_chat_context_is_prepended_to_messages(api_node: ApiNode, tokenizer):
    carol, messages = api_node.http("carol"), [{"role": "system", "content": prose(6)}]
    context = carol.post("/v1/contexts", json={"model": api_node.model, "messages": messages}).json()
    question = [{"role": "user", "content": "Why?"}]
    chat = api_node.sdk("carol").chat.completions.create(model=api_node.model, messages=question, max_tokens=2,
                                                         extra_body={"cached_context": context["id"]})  # fmt: skip
    assert chat.usage.prompt_tokens == len(_chat_ids(tokenizer, messages + question))
    assert cached_tokens(chat.usage) >= TOKENS_PER_CHUNK
    assert carol.delete(f"/v1/contexts/{context['id']}").json()["deleted"] is True


def test_context_ttl_expiry_removes_record_and_chunks(api_node: ApiNode, api_store_dir: Path, tokenizer):
    carol, text = api_node.http("carol"), prose(7)
    context = carol.post("/v1/contexts", json={"model": api_node.model, "text": text}).json()
    ids = _ids(tokenizer, text)
    assert num_chunks_stored(api_store_dir, ids, "carol") == len(ids) // TOKENS_PER_CHUNK > 0
    # A short TTL from now (a TTL shorter than the registration itself would expire the context mid-way).
    assert carol.patch(f"/v1/contexts/{context['id']}", json={"ttl": 0.3}).status_code == 200
    time.sleep(0.5)
    assert carol.get(f"/v1/contexts/{context['id']}").status_code == 404
    assert wait_until(lambda: num_chunks_stored(api_store_dir, ids, "carol") == 0, timeout_s=10)  # swept


def test_context_validation(api_node: ApiNode):
    carol = api_node.http("carol")
    too_big = carol.post("/v1/contexts", json={"model": api_node.model, "text": " hello" * 9000})  # > max_model_len
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "context_too_large"
    both = carol.post("/v1/contexts", json={"model": api_node.model, "text": "a", "messages": []})
    assert both.status_code == 400
    past = carol.post(
        "/v1/contexts", json={"model": api_node.model, "text": "a", "expire_time": "2001-01-01T00:00:00Z"}
    )
    assert past.status_code == 400 and past.json()["error"]["param"] == "ttl"
    assert carol.get("/v1/contexts/ctx_nope").status_code == 404
    assert carol.patch("/v1/contexts/ctx_nope", json={}).status_code == 400
    assert carol.get("/v1/contexts").json()["data"] == []  # nothing was registered


def test_background_registration_reports_progress(api_node: ApiNode):
    carol = api_node.http("carol")
    created = carol.post("/v1/contexts", json={"model": api_node.model, "text": prose(8), "wait": False})
    assert created.status_code in (200, 202)
    path = f"/v1/contexts/{created.json()['id']}"
    assert wait_until(lambda: carol.get(path).json()["state"] == "ACTIVE")
    progress = carol.get(path).json()["progress"]
    assert progress["stored_chunks"] == progress["total_chunks"] > 0
    assert carol.delete(path).json()["deleted"] is True
