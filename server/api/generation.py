"""From a validated request to the engine and back: prompt token ids (with a cached context prepended), limits,
the non-streaming result and the SSE stream, plus the per-request log line and metrics.

The first delta is awaited before any response starts, so every failure before the first token (engine not
ready, a store outage turned into recompute never fails) still gets a proper status code; TTFT is measured there.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from cachegen import obs
from cachegen.config import ServerSettings
from server.api.engine_host import Engine, EngineNotReady, GenerationDelta, GenerationRequest, SamplingOptions
from server.api.errors import ApiError
from server.api.registry import ContextRecord
from server.api.schemas import ChatCompletionRequest, CompletionRequest, usage

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Outcome:
    """What a finished (or finishing) generation produced so far."""

    text: str = ""
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    ttft_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def add(self, delta: GenerationDelta) -> None:
        self.text += delta.text
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.num_prompt_tokens, self.num_cached_tokens = delta.num_prompt_tokens, delta.num_cached_tokens
        self.num_output_tokens = delta.num_output_tokens

    def usage(self) -> dict[str, Any]:
        return usage(self.num_prompt_tokens, self.num_cached_tokens, self.num_output_tokens)


def check_model(engine: Engine, model: str) -> None:
    if not engine.is_ready:
        raise EngineNotReady("the engine is starting; retry in a few seconds")
    if model != engine.model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {engine.model_name!r}",
                       "model_not_found", "model")  # fmt: skip


def completion_ids(engine: Engine, body: CompletionRequest, context: ContextRecord | None) -> list[int]:
    """Prompt token ids: the context's ids, then the prompt (tokens as given, or text tokenized)."""
    prefix = list(context.token_ids) if context else []
    if isinstance(body.prompt, list):
        ids = list(body.prompt)
        if any(not 0 <= token < 1 << 31 for token in ids):
            raise ApiError(400, "prompt token ids must be non-negative integers", "invalid_prompt", "prompt")
    else:
        ids = engine.encode(body.prompt, is_start=not prefix) if body.prompt else []
    if not prefix + ids:
        raise ApiError(400, "prompt must not be empty", "invalid_prompt", "prompt")
    return prefix + ids


def chat_ids(engine: Engine, body: ChatCompletionRequest, context: ContextRecord | None) -> list[int]:
    """A chat context's messages go first in the conversation; a text context's ids go before the template."""
    try:
        messages = [message.as_template_input() for message in body.messages]
    except ValueError as exc:
        raise ApiError(400, str(exc), "invalid_content", "messages") from None
    if context is not None and context.kind == "chat":
        ids = engine.encode_chat(list(context.messages or ()) + messages, add_generation_prompt=True)
        if ids[: len(context.token_ids)] != context.token_ids:
            log.warning("chat template changed the context's tokens; its cache will not match id=%s", context.id)
        return ids
    prefix = list(context.token_ids) if context else []
    return prefix + engine.encode_chat(messages, add_generation_prompt=True)


def sampling_for(body: CompletionRequest | ChatCompletionRequest, budget: int | None, num_prompt: int,
                 settings: ServerSettings) -> SamplingOptions:  # fmt: skip
    """Decoding options; 400 when prompt plus ``max_tokens`` cannot fit the model's context."""
    room = settings.max_model_len - num_prompt
    if room < 1 or (budget is not None and budget > room):
        raise ApiError(
            400, f"this model's maximum context length is {settings.max_model_len} tokens; the prompt has "
            f"{num_prompt} and {budget or 1} more were requested", "context_length_exceeded", "messages",
        )  # fmt: skip
    max_tokens = budget if budget is not None else min(settings.max_tokens_default, room)
    return SamplingOptions(max_tokens, body.temperature, body.top_p, body.seed, body.stop_list())


def new_engine_request(request_id: str, ids: list[int], tenant: str, sampling: SamplingOptions,
                       transfer: dict[str, Any]) -> GenerationRequest:  # fmt: skip
    # A client may reuse X-Request-Id; the engine needs a unique id per request.
    return GenerationRequest(f"{request_id}-{secrets.token_hex(4)}", ids, tenant, sampling, transfer)


@dataclass
class Run:
    """One generation in flight: its deltas, what they added up to, and where to account for it."""

    deltas: AsyncIterator[GenerationDelta]
    outcome: Outcome
    endpoint: str
    request_id: str
    first: GenerationDelta | None = None

    @classmethod
    async def start(cls, engine: Engine, request: GenerationRequest, endpoint: str, request_id: str) -> Run:
        """Submit and wait for the first delta (TTFT)."""
        run = cls(aiter(engine.generate(request)), Outcome(), endpoint, request_id)
        try:
            first = await anext(run.deltas)
        except ValueError as exc:  # vLLM's own request validation (e.g. a token id outside the vocabulary)
            raise ApiError(400, str(exc), "invalid_request") from None
        run.outcome.ttft_s = time.perf_counter() - run.outcome.started
        run.outcome.add(first)
        run.first = first
        obs.API_TTFT_SECONDS.labels(endpoint=endpoint).observe(run.outcome.ttft_s)
        return run

    async def rest(self) -> AsyncIterator[GenerationDelta]:
        yield self.first
        async for delta in self.deltas:
            self.outcome.add(delta)
            yield delta
        self.finish()

    async def collect(self) -> Outcome:
        async for _ in self.rest():
            pass
        return self.outcome

    def finish(self) -> None:
        done = self.outcome
        for counter, value in ((obs.API_PROMPT_TOKENS, done.num_prompt_tokens),
                               (obs.API_CACHED_TOKENS, done.num_cached_tokens),
                               (obs.API_COMPLETION_TOKENS, done.num_output_tokens)):  # fmt: skip
            counter.labels(endpoint=self.endpoint).inc(value)
        log.info(
            "generation done request_id=%s endpoint=%s prompt_tokens=%d cached_tokens=%d completion_tokens=%d "
            "ttft_ms=%.1f total_ms=%.1f finish=%s", self.request_id, self.endpoint, done.num_prompt_tokens,
            done.num_cached_tokens, done.num_output_tokens, 1e3 * done.ttft_s,
            1e3 * (time.perf_counter() - done.started), done.finish_reason,
        )  # fmt: skip


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def sse_stream(run: Run, chunk_of: Callable[[GenerationDelta | None, bool], dict[str, Any]],
                     include_usage: bool) -> AsyncIterator[str]:  # fmt: skip
    """SSE events: ``chunk_of(delta, is_first)`` per delta, a usage chunk (``chunk_of(None, ...)``) when asked,
    then ``[DONE]``. A failure after the first token ends the stream with an error event."""
    is_first = True
    try:
        async for delta in run.rest():
            yield sse(chunk_of(delta, is_first))
            is_first = False
        if include_usage:
            yield sse({**chunk_of(None, False), "choices": [], "usage": run.outcome.usage()})
    except Exception as exc:  # the status line is already sent: report in-band, as OpenAI does
        log.exception("stream failed request_id=%s", run.request_id)
        yield sse({"error": {"message": f"generation failed: {type(exc).__name__}", "type": "server_error",
                             "param": None, "code": "internal_error"}})  # fmt: skip
    yield sse("[DONE]")
