"""The engine behind the HTTP API: vLLM's AsyncLLM with the cachegen connector, in this process.

The API talks to it only through ``Engine`` (a protocol), the seam between HTTP handling and generation.
Start-up is blocking (~20-40 s on 2 cores) and runs in a thread while the app already answers ``/health`` with
503. The CPU environment (preloaded OpenMP, thread binding) must be in place before this process started:
``server.api_cli`` re-executes itself once with ``server.engine.engine_env``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cachegen.config import Settings
from cachegen.errors import ModelNotReady
from cachegen.model import kv_layout, model_fingerprint
from cachegen.spec import KVLayout
from server.engine import llm_kwargs

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    """What the API lets a client choose about decoding."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One request to the engine: token ids, the tenant (vLLM ``cache_salt``) and connector switches."""

    request_id: str
    token_ids: list[int]
    tenant: str
    sampling: SamplingOptions
    transfer: dict[str, Any] = field(default_factory=dict)  # kv_transfer_params["cachegen"]


@dataclass(frozen=True, slots=True)
class GenerationDelta:
    """New output since the previous delta; the counts are totals so far."""

    text: str
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int


class Engine(Protocol):
    """What the API needs from an engine."""

    model_name: str
    model_dir: Path

    @property
    def is_ready(self) -> bool: ...

    @property
    def chunk_space(self) -> tuple[KVLayout, bytes]:
        """The KV layout and model fingerprint the connector keys chunks with."""

    def encode(self, text: str, *, is_start: bool = True) -> list[int]:
        """Token ids of plain text; ``is_start`` adds the tokenizer's special start tokens (if it has any)."""

    def encode_chat(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool) -> list[int]:
        """Token ids of a conversation through the model's chat template."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Stream deltas until the request finishes; cancelling the iteration aborts the request."""


class EngineNotReady(ModelNotReady):
    """The engine is still starting (or failed to start): 503."""


class VllmEngine:
    """AsyncLLM with the cachegen connector. ``start`` blocks; call it in a thread."""

    def __init__(self, settings: Settings, model_dir: Path) -> None:
        # The connector opens the store from the URL alone: fold the token and deadline into it.
        url = settings.store.resolved_url(settings.store_url())
        self.settings = settings.model_copy(update={"store": settings.store.model_copy(update={"url": url})})
        self.model_dir = model_dir
        self.model_name = settings.server.served_model_name or model_dir.name
        self.start_error: str | None = None
        self._llm: Any = None
        self._tokenizer: Any = None
        self._chunk_space: tuple[KVLayout, bytes] | None = None

    @property
    def is_ready(self) -> bool:
        return self._llm is not None and not self._llm.errored

    def start(self) -> None:
        """Load the tokenizer and start the engine (blocking; ~20-40 s on CPU)."""
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            kwargs = llm_kwargs(
                self.settings, self.model_dir, is_connector=True,
                is_prefix_caching=self.settings.server.is_prefix_caching,
            )  # fmt: skip
            kwargs["served_model_name"] = self.model_name
            self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
            dtype = str(self._llm.model_config.dtype).removeprefix("torch.")
            layout = kv_layout(self.model_dir, dtype, self.settings.codec.tokens_per_chunk)
            self._chunk_space = (layout, model_fingerprint(self.model_dir, layout))
        except Exception as exc:  # any start failure is reported on /health, not raised into the server loop
            self.start_error = f"{type(exc).__name__}: {exc}"
            log.exception("engine start failed")
            raise
        log.info("engine ready model=%s dir=%s", self.model_name, self.model_dir)

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    @property
    def chunk_space(self) -> tuple[KVLayout, bytes]:
        self._check_ready()
        assert self._chunk_space is not None
        return self._chunk_space

    def encode(self, text: str, *, is_start: bool = True) -> list[int]:
        self._check_ready()
        return list(self._tokenizer(text, add_special_tokens=is_start)["input_ids"])

    def encode_chat(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool) -> list[int]:
        self._check_ready()
        if not getattr(self._tokenizer, "chat_template", None):
            raise ModelNotReady(f"model {self.model_name} has no chat template; use /v1/completions")
        ids = self._tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        self._check_ready()
        options = request.sampling
        params = SamplingParams(
            max_tokens=options.max_tokens, temperature=options.temperature, top_p=options.top_p,
            seed=options.seed, stop=list(options.stop) or None, output_kind=RequestOutputKind.DELTA,
            extra_args={"kv_transfer_params": {"cachegen": request.transfer}},
        )  # fmt: skip
        prompt = TokensPrompt(prompt_token_ids=request.token_ids, cache_salt=request.tenant)
        num_output = 0
        async for output in self._llm.generate(prompt, params, request.request_id):
            completion = output.outputs[0]
            num_output += len(completion.token_ids)
            yield GenerationDelta(
                text=completion.text, finish_reason=completion.finish_reason,
                num_prompt_tokens=len(request.token_ids), num_cached_tokens=output.num_cached_tokens or 0,
                num_output_tokens=num_output,
            )  # fmt: skip

    def _check_ready(self) -> None:
        if not self.is_ready:
            raise EngineNotReady(self.start_error or "the engine is starting; retry in a few seconds")
