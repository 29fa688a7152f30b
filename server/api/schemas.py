"""Request and response bodies of the HTTP API, in OpenAI's shapes (plus cachegen's extra body fields).

Unknown request fields are ignored, as OpenAI-compatible servers do; the fields cachegen adds are
``cached_context`` (a context id whose content is prepended) and ``cachegen`` (``CacheGenOptions``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cachegen.spec import LEVELS


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CacheGenOptions(_Request):
    """Per-request knobs for the KV streamer, forwarded in ``kv_transfer_params["cachegen"]``: ``slo_ms`` is the
    time-to-first-token target of the load; ``min_quality`` the lowest level quality accepted
    (``cachegen.spec.level_quality``; 0 allows every level, higher values exclude lossier levels)."""

    load: bool = True
    save: bool = True
    slo_ms: Annotated[float, Field(gt=0)] | None = None
    min_quality: Annotated[int, Field(ge=0, le=len(LEVELS))] | None = None

    def transfer_params(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    model: str
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    cached_context: str | None = None
    cachegen: CacheGenOptions = CacheGenOptions()

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    echo: Literal[False] = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[int] | list[str]) -> str | list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError("one prompt per request (batches of prompts are not supported)")
            return prompt[0]
        return prompt


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]]
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        """The message for a chat template: text parts are joined; other parts are refused."""
        if isinstance(self.content, str):
            return {"role": self.role, "content": self.content}
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, got type {part.get('type')!r}")
            texts.append(part["text"])
        return {"role": self.role, "content": "".join(texts)}


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def ttl_seconds(value: float | str | None) -> float | None:
    """Gemini writes TTLs as ``"300s"``; plain numbers of seconds are accepted too."""
    if value is None or isinstance(value, int | float):
        return value
    text = value.strip().removesuffix("s")
    try:
        return float(text)
    except ValueError:
        raise ValueError(f'ttl must be seconds, e.g. 3600 or "3600s", got {value!r}') from None


class ContextCreate(_Request):
    """Body of ``POST /v1/contexts``: text or chat messages, and how long to keep them."""

    model: str
    text: str | None = None
    messages: list[ChatMessage] | None = None
    display_name: Annotated[str, Field(max_length=128)] = ""
    ttl: float | str | None = None
    expire_time: datetime | None = None
    wait: bool = True

    @model_validator(mode="after")
    def _one_content(self) -> ContextCreate:
        if (self.text is None) == (self.messages is None):
            raise ValueError("give exactly one of text or messages")
        if self.text is not None and not self.text:
            raise ValueError("text must not be empty")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        if self.ttl is not None and self.expire_time is not None:
            raise ValueError("give ttl or expire_time, not both")
        self.ttl = ttl_seconds(self.ttl)
        return self


class ContextUpdate(_Request):
    """Body of ``PATCH /v1/contexts/{id}``: a new TTL (from now) or expire time."""

    ttl: float | str | None = None
    expire_time: datetime | None = None

    @model_validator(mode="after")
    def _one_expiry(self) -> ContextUpdate:
        if (self.ttl is None) == (self.expire_time is None):
            raise ValueError("give exactly one of ttl or expire_time")
        self.ttl = ttl_seconds(self.ttl)
        return self


def usage(num_prompt: int, num_cached: int, num_completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": num_prompt,
        "completion_tokens": num_completion,
        "total_tokens": num_prompt + num_completion,
        "prompt_tokens_details": {"cached_tokens": num_cached},
    }


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
