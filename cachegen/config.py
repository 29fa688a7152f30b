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
    token: str = Field("", description="Bearer token for a grpc:// store (added to the URL as ?token=).")
    timeout_s: float = Field(5.0, description="Deadline of one store call; past it the request recomputes.")

    def resolved_url(self, default: str) -> str:
        """``url`` (or ``default``) with ``token`` and ``timeout_s`` added for a grpc:// store."""
        url = self.url or default
        if not url.startswith("grpc://"):
            return url
        options = [f"timeout_s={self.timeout_s:g}"] if "timeout_s=" not in url else []
        if self.token and "token=" not in url:
            options.append(f"token={self.token}")
        return url + ("&" if "?" in url else "?") + "&".join(options) if options else url


class CodecSettings(BaseModel):
    tokens_per_chunk: int = Field(DEFAULT_TOKENS_PER_CHUNK, description="Changes keys: a multiple of the block size.")
    save_levels: list[str] = Field(
        ["raw"], description="Levels every new chunk is stored at (names from cachegen.spec.LEVELS)."
    )
    tables_path: str = Field("", description="Calibrated tables; empty: <home>/tables/<model id>.cgct if present.")


class StreamSettings(BaseModel):
    is_async_load: bool = Field(True, description="Load KV in a background thread so the scheduler never waits.")
    slo_s: float = Field(float("inf"), description="Default time-to-first-token target of a load (per request too).")
    min_quality: int = Field(0, description="Default quality floor (cachegen.spec.level_quality); 0 allows all.")
    prior_bandwidth_bps: float = Field(1e9, description="Throughput assumed before the first chunk is measured.")
    prior_decode_bytes_per_s: float = Field(300e6, description="Decode speed assumed before it is measured.")
    prior_prefill_tokens_per_s: float = Field(1000.0, description="Prefill speed assumed before it is measured.")
    shape_trace: str = Field("", description="In-process link shaping: a rate ('100mbit') or a trace file path.")


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = Field("", description="Local HF model dir; empty means the bundled SmolLM2-135M-Instruct.")
    served_model_name: str = ""
    max_model_len: int = 8192
    kv_cache_bytes: int = Field(2 << 30, description="vLLM's KV pool; vLLM would otherwise take 92% of RAM.")
    is_eager: bool = Field(True, description="Eager mode starts in ~14 s; compiled recompiles on every start.")
    is_prefix_caching: bool = Field(True, description="vLLM's in-memory prefix cache, in front of the store.")
    api_keys: dict[str, str] = Field(
        default_factory=dict, description="API key -> tenant. Empty: no auth, every caller is the default tenant."
    )
    api_keys_file: Path | None = Field(None, description="File of 'tenant key' lines, merged into api_keys.")
    default_tenant: str = Field("default", description="Tenant of every caller when no API keys are configured.")
    max_body_bytes: int = Field(4 << 20, description="Larger request bodies get 413.")
    max_context_tokens: int = Field(0, description="Largest context or prompt in tokens; 0 means max_model_len.")
    max_tokens_default: int = Field(256, description="max_tokens when a request gives none.")
    context_ttl_s: float = Field(3600.0, description="TTL of a cached context when the request gives none.")
    max_context_ttl_s: float = Field(30 * 86400.0, description="Longest TTL or expire_time accepted.")
    contexts_dir: Path | None = Field(None, description="Context records (JSON files); default <home>/contexts.")
    context_sweep_s: float = Field(10.0, description="How often expired contexts (and their chunks) are removed.")
    register_timeout_s: float = Field(300.0, description="How long POST /v1/contexts waits for the store.")


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

    def contexts_dir(self) -> Path:
        return self.server.contexts_dir or self.home / "contexts"
