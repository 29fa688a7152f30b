"""One settings model for every cachegen process.

Build it once at an entry point with ``Settings.from_env()`` (``CACHEGEN_STORE__URL=...``), apply CLI flags on
top, then hand each component only its own section. No other module reads the environment.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from cachegen.spec import DEFAULT_TOKENS_PER_CHUNK


def default_home() -> Path:
    return Path.home() / ".cache" / "cachegen"


class StoreSettings(BaseModel):
    url: str = Field("", description="disk:///path (default: <home>/kv) or memory://")
    capacity_bytes: int = Field(8 << 30, description="Disk backend bound; least recently used chunks go first.")


class CodecSettings(BaseModel):
    tokens_per_chunk: int = Field(DEFAULT_TOKENS_PER_CHUNK, description="Changes keys: a multiple of the block size.")
    level: str = Field("raw", description="Level written on save; see cachegen.spec.LEVELS.")


class StreamSettings(BaseModel):
    is_async_load: bool = Field(True, description="Load KV in a background thread so the scheduler never waits.")


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = Field("", description="Local HF model dir; empty means the bundled SmolLM2-135M-Instruct.")
    served_model_name: str = ""
    max_model_len: int = 8192
    kv_cache_bytes: int = Field(2 << 30, description="vLLM's KV pool; vLLM would otherwise take 92% of RAM.")
    is_eager: bool = Field(True, description="Eager mode starts in ~14 s; compiled recompiles on every start.")


class LogSettings(BaseModel):
    level: str = "INFO"
    is_json: bool = False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CACHEGEN_", env_nested_delimiter="__", frozen=True)

    home: Path = Field(default_factory=default_home, description="Cache dir for the model and the local store.")
    store: StoreSettings = StoreSettings()
    codec: CodecSettings = CodecSettings()
    stream: StreamSettings = StreamSettings()
    server: ServerSettings = ServerSettings()
    log: LogSettings = LogSettings()

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        return cls(**overrides)

    def store_url(self) -> str:
        return self.store.url or f"disk://{self.home / 'kv'}"
