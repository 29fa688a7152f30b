"""One definition of every shared fact: KV shapes, levels, chunk keys, format constants.

Every other module imports these names; none writes a literal dimension, level id or key layout of its own.
The C++ core mirrors the numeric constants in ``kernels/include/cachegen/spec.h``.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

MAGIC = b"CGKV"
FORMAT_VERSION = 1

DEFAULT_TOKENS_PER_CHUNK = 256
"""Two of vLLM's 128-token CPU blocks: chunks are always whole engine blocks."""

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Shape of one model's KV cache, as every cachegen component sees it.

    The engine-neutral layout of ``num_tokens`` tokens is ``(layers, 2, kv_heads, tokens, head_dim)``:
    per layer, K then V, each ``[heads, tokens, head_dim]`` after RoPE, as HF transformers holds it.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    tokens_per_chunk: int = DEFAULT_TOKENS_PER_CHUNK

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"unsupported KV dtype {self.dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "tokens_per_chunk"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.num_kv_heads, num_tokens, self.head_dim)

    @property
    def values_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim

    @property
    def bytes_per_token(self) -> int:
        return self.values_per_token * DTYPE_BYTES[self.dtype]

    def digest(self) -> bytes:
        """16 bytes naming this layout; part of every key, so a change of layout never reuses old KV."""
        text = f"{self.num_layers}/{self.num_kv_heads}/{self.head_dim}/{self.dtype}/{self.tokens_per_chunk}"
        return hashlib.blake2b(text.encode(), digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class Level:
    """A compression level. ``id`` goes on the wire: add new levels at the end, never renumber."""

    id: int
    name: str
    is_lossless: bool


LEVELS: tuple[Level, ...] = (
    Level(0, "raw", True),
    Level(1, "lossless", True),
    Level(2, "q8", False),
    Level(3, "q32", False),
    Level(4, "default", False),
    Level(5, "small", False),
    Level(6, "pca3", False),
    Level(7, "pca2", False),
    Level(8, "pca2t", False),
    Level(9, "pca2x", False),
)
"""Level 0 stores the engine's KV values as they are (bf16 for SmolLM2); coded levels follow. Levels 1-5 are
rANS-coded with per-model tables (``cachegen calibrate``), 6-9 transform-coded with a per-model transform
(calibrated with the model; 8 also gives each token a step class, 9 predicts each layer from the one before);
FORMAT.md §5 defines each."""

LOSSY_ORDER: tuple[str, ...] = ("q8", "pca2x", "pca3", "q32", "pca2", "pca2t", "default", "small")
"""Lossy levels from most to least faithful, by measured fidelity (README's codec table), not by id."""

LEVEL_BY_NAME = {level.name: level for level in LEVELS}
RAW_LEVEL = LEVELS[0]


_CHAIN_DOMAIN = b"cachegen/chain/v1"
_KEY_STRUCT = struct.Struct("<16s16s32sIB")


def chain_seed(model_id: bytes, tenant: str) -> bytes:
    """Root of the hash chain: binds every chunk key to one model fingerprint and one tenant."""
    salt = tenant.encode()
    data = _CHAIN_DOMAIN + model_id + struct.pack("<I", len(salt)) + salt
    return hashlib.blake2b(data, digest_size=32).digest()


def prefix_hashes(token_ids: Sequence[int], tokens_per_chunk: int, seed: bytes) -> list[bytes]:
    """Chained hashes of the full chunks of ``token_ids``: entry i covers tokens [0, (i+1)*tokens_per_chunk).

    A trailing partial chunk gets no hash: only whole chunks are stored. Stable across processes and machines.
    """
    hashes: list[bytes] = []
    previous = seed
    for start in range(0, len(token_ids) - tokens_per_chunk + 1, tokens_per_chunk):
        chunk = token_ids[start : start + tokens_per_chunk]
        payload = struct.pack(f"<{len(chunk)}I", *chunk)
        previous = hashlib.blake2b(previous + payload, digest_size=32).digest()
        hashes.append(previous)
    return hashes


@dataclass(frozen=True, slots=True)
class ChunkKey:
    """Address of one stored chunk at one level. The only key layout; the store, streamer and connector share it."""

    model_id: bytes
    layout_digest: bytes
    prefix_hash: bytes
    chunk_index: int
    level: int

    def to_bytes(self) -> bytes:
        return _KEY_STRUCT.pack(self.model_id, self.layout_digest, self.prefix_hash, self.chunk_index, self.level)

    @classmethod
    def from_bytes(cls, data: bytes) -> ChunkKey:
        if len(data) != _KEY_STRUCT.size:
            raise ValueError(f"chunk key must be {_KEY_STRUCT.size} bytes, got {len(data)}")
        return cls(*_KEY_STRUCT.unpack(data))

    def hex(self) -> str:
        return self.to_bytes().hex()

    @property
    def group(self) -> str:
        """Hex id shared by all levels of one chunk (a Redis hash tag keeps them on one slot)."""
        return self.prefix_hash.hex()


def chunk_keys(
    token_ids: Sequence[int], layout: KVLayout, model_id: bytes, tenant: str, level: int = 0
) -> list[ChunkKey]:
    """Keys of every full chunk of a prompt, in order."""
    seed = chain_seed(model_id, tenant)
    hashes = prefix_hashes(token_ids, layout.tokens_per_chunk, seed)
    digest = layout.digest()
    return [ChunkKey(model_id, digest, h, i, level) for i, h in enumerate(hashes)]


def level_quality(level_id: int) -> int:
    """The planner's order of levels, higher is better: every exact level ranks above every lossy one, and exact
    levels tie (same values: the planner takes whichever arrives first); lossy levels follow
    (``LOSSY_ORDER``, finest first)."""
    lossy = [LEVEL_BY_NAME[name].id for name in LOSSY_ORDER]
    if any(level.id == level_id and level.is_lossless for level in LEVELS):
        return len(lossy) + 1
    if level_id not in lossy:
        raise ValueError(f"unknown level id {level_id}")
    return len(lossy) - lossy.index(level_id)
