"""The load generator: paced, concurrency-capped streaming requests to an OpenAI-compatible server.

Timing follows `vllm bench serve`: TTFT is the time to the first chunk carrying output (text, or a finish
reason: an immediate EOS has no text), ITL the gaps between later such chunks, latency the time to the end of
the stream. Requests that fail (HTTP error, an error event in
the stream, a broken connection) are kept with `success=False` and their error, never dropped.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from bench.serve_data import SampleRequest

CHAT_ENDPOINT = "/v1/chat/completions"


@dataclass(slots=True, frozen=True)
class ClientConfig:
    base_url: str
    endpoint: str
    model: str
    sampling: dict[str, Any] = field(default_factory=dict)  # temperature, ignore_eos, ...
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged into every request body, last
    headers: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 6 * 3600


@dataclass(slots=True)
class RequestOutput:
    """What one request measured. Times in seconds; `start_time` is on the run's `perf_counter` clock."""

    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start_time: float = 0.0
    generated_text: str = ""
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when the server reports it


def arrival_intervals(num_requests: int, request_rate: float, burstiness: float, seed: int) -> list[float]:
    """Gaps before each request: gamma(shape=burstiness, mean=1/rate); burstiness 1 is a Poisson process."""
    if burstiness <= 0:
        raise ValueError(f"--burstiness must be positive, got {burstiness}")
    if request_rate == float("inf"):
        return [0.0] * num_requests
    theta = 1.0 / (request_rate * burstiness)
    return np.random.default_rng(seed).gamma(shape=burstiness, scale=theta, size=num_requests).tolist()


def request_body(config: ClientConfig, sample: SampleRequest, history: list[dict]) -> dict:
    """Streaming body for either endpoint; `history` is the earlier turns of a multi-round session."""
    body: dict[str, Any] = {
        "model": config.model,
        "max_tokens": sample.output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
        **config.sampling,
    }
    messages = history + [{"role": "user", "content": sample.prompt}]
    if config.endpoint.endswith(CHAT_ENDPOINT):
        body["messages"] = messages
    else:
        body["prompt"] = _as_text(messages) if history else sample.prompt
    return {**body, **config.extra_body}


def _as_text(messages: list[dict]) -> str:
    """A multi-round history for the completions endpoint: plain alternating turns."""
    names = {"user": "User", "assistant": "Assistant"}
    turns = [f"{names[m['role']]}: {m['content']}" for m in messages]
    return "\n\n".join(turns) + "\n\nAssistant:"


def _chunk_token(chunk: dict) -> tuple[bool, str]:
    """(whether the chunk marks generated output, its text). A chunk with text or a finish_reason does (an EOS
    has no text); a chat chunk announcing only the role does not, as some servers send it before prefill."""
    choices = chunk.get("choices") or []
    if not choices:
        return False, ""
    choice = choices[0]
    text = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
    return bool(text) or choice.get("finish_reason") is not None, text or ""


def _apply_usage(output: RequestOutput, usage: dict) -> None:
    output.prompt_len = int(usage.get("prompt_tokens") or output.prompt_len)
    output.output_tokens = int(usage.get("completion_tokens") or 0)
    details = usage.get("prompt_tokens_details") or {}
    if details.get("cached_tokens") is not None:
        output.cached_tokens = int(details["cached_tokens"])


async def _read_stream(response: httpx.Response, output: RequestOutput, started: float) -> None:
    last = started
    num_chunks = 0  # chunks carrying output; a chunk may carry several tokens
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(f"error event: {chunk['error']}")
        now = time.perf_counter()
        is_token, text = _chunk_token(chunk)
        if is_token:
            if num_chunks == 0:
                output.ttft = now - started
            else:
                output.itl.append(now - last)
            last = now
            num_chunks += 1
            output.generated_text += text
        if chunk.get("usage"):
            _apply_usage(output, chunk["usage"])
    output.latency = time.perf_counter() - started
    output.output_tokens = output.output_tokens or num_chunks
    output.success = num_chunks > 0
    if not output.success:
        output.error = "stream ended without any output"


async def send_request(client: httpx.AsyncClient, config: ClientConfig, body: dict, prompt_len: int) -> RequestOutput:
    """POST one streaming request and measure it; any failure is recorded in the returned output."""
    output = RequestOutput(prompt_len=prompt_len)
    output.start_time = started = time.perf_counter()
    try:
        async with client.stream("POST", config.base_url + config.endpoint, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                output.error = f"HTTP {response.status_code}: {text[:500]}"
                return output
            await _read_stream(response, output, started)
    except (httpx.HTTPError, RuntimeError, ValueError, TypeError, KeyError) as exc:
        output.success = False
        output.error = f"{type(exc).__name__}: {exc}"
    return output


@dataclass(slots=True)
class _RunState:
    """Per-run bookkeeping: the semaphore and multi-round session histories (never shared between runs)."""

    semaphore: asyncio.Semaphore | None
    histories: dict[int, list[dict]] = field(default_factory=dict)
    locks: dict[int, asyncio.Lock] = field(default_factory=dict)


async def _one(client, config, sample: SampleRequest, state: _RunState) -> RequestOutput:
    if sample.session_id is None:
        return await _limited(client, config, request_body(config, sample, []), sample, state)
    # Locks are FIFO and tasks are created in dataset order, so a session's turns run in order; the session
    # lock is taken before a concurrency slot so a waiting turn never holds a slot idle.
    async with state.locks.setdefault(sample.session_id, asyncio.Lock()):
        history = state.histories.setdefault(sample.session_id, [])
        output = await _limited(client, config, request_body(config, sample, history), sample, state)
        history.append({"role": "user", "content": sample.prompt})
        history.append({"role": "assistant", "content": output.generated_text})
        return output


async def _limited(client, config, body: dict, sample: SampleRequest, state: _RunState) -> RequestOutput:
    if state.semaphore is None:
        return await send_request(client, config, body, sample.prompt_len)
    async with state.semaphore:
        return await send_request(client, config, body, sample.prompt_len)


async def run_load(
    config: ClientConfig,
    samples: list[SampleRequest],
    intervals: list[float],
    max_concurrency: int | None = None,
    on_done: Callable[[RequestOutput], None] | None = None,
) -> list[RequestOutput]:
    """Send every sample at its arrival time (cumulative `intervals`); outputs come back in dataset order."""
    state = _RunState(asyncio.Semaphore(max_concurrency) if max_concurrency else None)
    limits = httpx.Limits(max_connections=max_concurrency or len(samples) or 1, max_keepalive_connections=None)
    timeout = httpx.Timeout(config.timeout_s, connect=30.0)
    async with httpx.AsyncClient(headers=config.headers, limits=limits, timeout=timeout) as client:
        tasks = []
        started = time.perf_counter()
        for sample, due in zip(samples, np.cumsum(intervals).tolist()):
            if (delay := started + due - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(_one(client, config, sample, state))
            if on_done is not None:
                task.add_done_callback(lambda t: on_done(t.result()))
            tasks.append(task)
        return list(await asyncio.gather(*tasks))
