"""`cachegen serve` as a real process (FastAPI + vLLM + the connector, local disk store), driven by the
official openai SDK: completions and chat (streaming and not), reuse and tenant isolation, cached contexts with
TTL expiry, OpenAI-shaped errors."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest

from cachegen.store import open_store
from tests.integration.api_servers import ApiNode, cached_tokens

pytestmark = pytest.mark.engine


def corpus_text(start: int, num_chars: int) -> str:
    """Real English prose (CPython's documentation topics), sliced by characters (~4.4 characters a token)."""
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[name] for name in sorted(pydoc_data.topics.topics))
    return text[start : start + num_chars]


def test_completion_and_chat_with_the_sdk(api_node: ApiNode):
    sdk = api_node.sdk()
    completion = sdk.completions.create(model=api_node.model, prompt="The capital of France is", max_tokens=8,
                                        temperature=0)  # fmt: skip
    assert completion.choices[0].text and completion.usage.completion_tokens == 8
    assert cached_tokens(completion.usage) == 0
    streamed = list(sdk.completions.create(model=api_node.model, prompt="The capital of France is", max_tokens=8,
                                           temperature=0, stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text

    messages = [{"role": "user", "content": "Name three colours."}]
    chat = sdk.chat.completions.create(model=api_node.model, messages=messages, max_tokens=12, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    chunks = list(sdk.chat.completions.create(model=api_node.model, messages=messages, max_tokens=12, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens_details is not None


def test_second_request_reuses_and_other_tenant_does_not(api_node: ApiNode):
    prompt = corpus_text(0, 7000) + "\n\nQuestion: what is the text above about?\nAnswer:"
    alice, bob = api_node.sdk("alice"), api_node.sdk("bob")
    first = alice.completions.create(model=api_node.model, prompt=prompt, max_tokens=16, temperature=0)
    second = alice.completions.create(model=api_node.model, prompt=prompt, max_tokens=16, temperature=0)
    other = bob.completions.create(model=api_node.model, prompt=prompt, max_tokens=16, temperature=0)
    again = alice.completions.create(model=api_node.model, prompt=prompt, max_tokens=16, temperature=0)
    assert cached_tokens(first.usage) == 0
    assert cached_tokens(second.usage) == cached_tokens(again.usage) >= 1024
    assert cached_tokens(other.usage) == 0
    # Texts are compared within one arithmetic: full prefills, and loads of the same chunks. A full prefill and a
    # load round differently in bf16 and may flip a near-tie token (test_kv_reuse checks the two agree to rounding).
    assert first.choices[0].text == other.choices[0].text
    assert second.choices[0].text == again.choices[0].text


def _chunks_in_store(api_store_dir: Path, api_node: ApiNode, context_id: str) -> int:
    """How many of a context's chunks the store holds, read through the contexts registry on disk."""
    import json

    from cachegen.config import Settings
    from cachegen.model import ensure_model, kv_layout, model_fingerprint
    from cachegen.spec import chunk_keys

    record = json.loads((api_node.log_path.parent / "contexts" / f"{context_id}.json").read_text())
    model_dir = ensure_model(Settings.from_env().home)
    layout = kv_layout(model_dir, "bfloat16", 256)
    keys = chunk_keys(record["token_ids"], layout, model_fingerprint(model_dir, layout), record["tenant"])
    return len(open_store(f"disk://{api_store_dir}").lookup(keys[: record["num_chunks"]]))


def test_context_crud_reference_and_ttl(api_node: ApiNode, api_store_dir: Path):
    http = api_node.http()
    text = corpus_text(20000, 5000)
    created = http.post("/v1/contexts", json={"model": api_node.model, "text": text, "ttl": "600s"})
    assert created.status_code == 200, created.text
    context = created.json()
    assert (
        context["state"] == "ACTIVE" and context["progress"]["stored_chunks"] == context["progress"]["total_chunks"] > 0
    )
    assert _chunks_in_store(api_store_dir, api_node, context["id"]) == context["progress"]["total_chunks"]
    assert [c["id"] for c in http.get("/v1/contexts").json()["data"]] == [context["id"]]

    answer = api_node.sdk().completions.create(model=api_node.model, prompt="\n\nSummary:", max_tokens=8,
                                               temperature=0, extra_body={"cached_context": context["id"]})  # fmt: skip
    assert cached_tokens(answer.usage) >= 256 * context["progress"]["total_chunks"] - 256
    with pytest.raises(openai.NotFoundError):  # invisible to another tenant
        api_node.sdk("bob").completions.create(model=api_node.model, prompt="x",
                                               extra_body={"cached_context": context["id"]})  # fmt: skip

    patched = http.patch(f"/v1/contexts/{context['id']}", json={"ttl": 1}).json()
    assert patched["expire_time"] < context["expire_time"]
    time.sleep(2.5)  # past the TTL and at least one sweep
    assert http.get(f"/v1/contexts/{context['id']}").status_code == 404
    assert http.get("/v1/contexts").json()["data"] == []


def test_delete_removes_the_chunks(api_node: ApiNode, api_store_dir: Path):
    http = api_node.http()
    messages = [{"role": "system", "content": corpus_text(40000, 3000)}]
    context = http.post("/v1/contexts", json={"model": api_node.model, "messages": messages}).json()
    assert context["kind"] == "chat" and _chunks_in_store(api_store_dir, api_node, context["id"]) > 0
    question = [{"role": "user", "content": "Summarize."}]
    chat = api_node.sdk().chat.completions.create(model=api_node.model, messages=question, max_tokens=4,
                                                  extra_body={"cached_context": context["id"]})  # fmt: skip
    assert cached_tokens(chat.usage) >= 256
    record_path = api_node.log_path.parent / "contexts" / f"{context['id']}.json"
    import json

    record = json.loads(record_path.read_text())
    assert http.delete(f"/v1/contexts/{context['id']}").json()["deleted"] is True
    assert not record_path.exists()
    from cachegen.config import Settings
    from cachegen.model import ensure_model, kv_layout, model_fingerprint
    from cachegen.spec import chunk_keys

    model_dir = ensure_model(Settings.from_env().home)
    layout = kv_layout(model_dir, "bfloat16", 256)
    keys = chunk_keys(record["token_ids"], layout, model_fingerprint(model_dir, layout), record["tenant"])
    assert open_store(f"disk://{api_store_dir}").lookup(keys[: record["num_chunks"]]) == []


def test_bad_requests_get_openai_errors(api_node: ApiNode):
    sdk = api_node.sdk()
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{api_node.base_url}/v1", api_key="sk-not-a-key", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.completions.create(model="gpt-4o", prompt="hi")
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model=api_node.model, messages=[{"role": "wizard", "content": "hi"}])
    assert caught.value.body["param"].startswith("messages")
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.completions.create(model=api_node.model, prompt="hi", max_tokens=9000)
    assert caught.value.body["code"] == "context_length_exceeded"
    too_big = api_node.http().post("/v1/completions", json={"model": api_node.model, "prompt": "x" * (2 << 20)})
    assert too_big.status_code == 413 and set(too_big.json()["error"]) == {"message", "type", "param", "code"}
    assert [m.id for m in sdk.models.list()] == [api_node.model]


def test_metrics_and_health(api_node: ApiNode):
    assert httpx.get(f"{api_node.base_url}/health").json() == {"status": "ok"}
    metrics = httpx.get(f"{api_node.base_url}/metrics").text
    assert "cachegen_api_ttft_seconds_count" in metrics and "cachegen_api_cached_tokens_total" in metrics
