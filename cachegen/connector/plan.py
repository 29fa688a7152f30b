"""Scheduler-side bookkeeping of the connector: which chunks each step loads and saves. Pure; no vLLM import.

Token positions are prompt positions. A chunk is ``tokens_per_chunk`` tokens, always a whole number of engine
blocks, so chunk i lives in blocks ``[i * blocks_per_chunk, (i + 1) * blocks_per_chunk)`` of the request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cachegen.spec import ChunkKey


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    """One chunk of one request, placed in the engine's paged cache."""

    index: int
    key: ChunkKey
    block_ids: tuple[int, ...]
    first_token: int = 0
    """Offset inside the chunk of the first token to write; >0 when the engine's prefix cache holds the start."""
    levels: tuple[tuple[int, int], ...] = ()
    """(level id, stored bytes) held in the store for this chunk, from the lookup."""


@dataclass(frozen=True, slots=True)
class TransferJob:
    """Chunks of one request to load into, or save from, the paged cache in one engine step."""

    request_id: str
    spans: tuple[ChunkSpan, ...]
    slo_s: float = float("inf")
    """Time-to-first-token target for the load (loads only)."""
    min_quality: int = 0
    suffix_tokens: int = 0
    """Prompt tokens after the loaded prefix, prefilled after the load (loads only)."""


@dataclass(slots=True)
class RequestState:
    """What the scheduler side remembers about one running request."""

    keys: list[ChunkKey]
    block_ids: list[int] = field(default_factory=list)
    num_stored_chunks: int = 0
    """Leading chunks already in the store (found on lookup, or saved by us): never saved again."""
    is_save_enabled: bool = True


def num_loadable_chunks(num_prompt_tokens: int, tokens_per_chunk: int) -> int:
    """Chunks that may be loaded: the engine always recomputes the last prompt token, so it is never loaded."""
    return max(num_prompt_tokens - 1, 0) // tokens_per_chunk


def num_complete_chunks(num_computed_tokens: int, num_prompt_tokens: int, tokens_per_chunk: int) -> int:
    """Prompt chunks whose every token has KV in the paged cache once ``num_computed_tokens`` are computed."""
    return min(num_computed_tokens, num_prompt_tokens) // tokens_per_chunk


def chunk_block_ids(block_ids: list[int], chunk_index: int, blocks_per_chunk: int) -> tuple[int, ...]:
    start = chunk_index * blocks_per_chunk
    blocks = tuple(block_ids[start : start + blocks_per_chunk])
    assert len(blocks) == blocks_per_chunk, "a complete chunk always has all its blocks allocated"
    return blocks


def load_spans(
    state: RequestState,
    hits: Sequence[Mapping[int, int]],
    num_local_tokens: int,
    tokens_per_chunk: int,
    blocks_per_chunk: int,
) -> tuple[ChunkSpan, ...]:
    """Spans that load chunks ``[num_local_tokens // tokens_per_chunk, len(hits))``; ``hits[i]``: levels held.

    ``num_local_tokens`` (block-aligned) are already in the engine's prefix cache and are not overwritten.
    """
    spans = []
    for index in range(num_local_tokens // tokens_per_chunk, len(hits)):
        first = max(num_local_tokens - index * tokens_per_chunk, 0)
        blocks = chunk_block_ids(state.block_ids, index, blocks_per_chunk)
        spans.append(ChunkSpan(index, state.keys[index], blocks, first, tuple(sorted(hits[index].items()))))
    return tuple(spans)


def save_spans(
    state: RequestState,
    num_computed_after_step: int,
    num_prompt_tokens: int,
    tokens_per_chunk: int,
    blocks_per_chunk: int,
) -> tuple[ChunkSpan, ...]:
    """Spans of chunks that become complete by the end of this step and are not stored yet; marks them stored."""
    if not state.is_save_enabled:
        return ()
    complete = min(len(state.keys), num_complete_chunks(num_computed_after_step, num_prompt_tokens, tokens_per_chunk))
    spans = tuple(
        ChunkSpan(i, state.keys[i], chunk_block_ids(state.block_ids, i, blocks_per_chunk))
        for i in range(state.num_stored_chunks, complete)
    )
    state.num_stored_chunks = max(state.num_stored_chunks, complete)
    return spans
