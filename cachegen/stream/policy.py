"""Which level to fetch for the next chunk of a cached prefix, or whether to stop and recompute the rest.

CacheGen's rule, done with measurements: the time left before the time-to-first-token target, minus the
suffix prefill that must follow, is spread evenly over the chunks still to come; the next chunk gets the
highest-quality level whose transfer fits its share at the estimated throughput. The engine's computed tokens
must form a prefix, so a chunk sent as text means every later chunk is recomputed too: "text" stops the fetch.
Pure and deterministic: the same measurements give the same decisions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

RECOMPUTE = -1
"""The decision to stop fetching and let the engine prefill the remaining chunks from their tokens."""


@dataclass(frozen=True, slots=True)
class LevelOption:
    """One stored level of one chunk. ``quality`` orders levels: higher is closer to the exact KV."""

    level: int
    size_bytes: int
    quality: int


@dataclass(frozen=True, slots=True)
class NodeSpeeds:
    """This node's measured speeds (runtime discoveries, never settings)."""

    decode_bytes_per_s: float
    """Coded bytes decoded and injected per second for a level not measured yet; overlaps the next fetch."""
    prefill_tokens_per_s: float
    """Prefill throughput of this engine: the price of recomputing a chunk."""
    decode_by_level: tuple[tuple[int, float], ...] = ()
    """Measured (level, bytes/s) pairs: levels decode at very different speeds (raw is a copy, the entropy-coded
    lossless level ~10x slower on CPU), so one average would make a slow level look as cheap as a fast one."""

    def decode_rate(self, level: int) -> float:
        return dict(self.decode_by_level).get(level, self.decode_bytes_per_s)

    def with_decode(self, level: int, bytes_per_s: float) -> NodeSpeeds:
        """These speeds with ``level``'s decode rate moved halfway towards a new measurement."""
        rates = dict(self.decode_by_level)
        rates[level] = 0.5 * bytes_per_s + 0.5 * rates.get(level, bytes_per_s)
        return NodeSpeeds(self.decode_bytes_per_s, self.prefill_tokens_per_s, tuple(sorted(rates.items())))


@dataclass(frozen=True, slots=True)
class StreamTarget:
    """Per-request goals."""

    slo_s: float
    """Time-to-first-token target, counted from the start of the fetch."""
    min_quality: int = 0
    """No level below this quality is fetched; recompute (exact) is always allowed."""
    suffix_tokens: int = 0
    """Tokens after the cached prefix that must be prefilled before the first token."""


def chunk_seconds(option: LevelOption, bandwidth_bps: float, speeds: NodeSpeeds) -> float:
    """Critical-path time of one chunk: fetch and decode overlap across chunks, so the slower one counts."""
    transfer_s = 8 * option.size_bytes / max(bandwidth_bps, 1.0)
    decode_s = option.size_bytes / max(speeds.decode_rate(option.level), 1.0)
    return max(transfer_s, decode_s)


def recompute_seconds(num_tokens: int, speeds: NodeSpeeds) -> float:
    return num_tokens / max(speeds.prefill_tokens_per_s, 1e-9)


def choose(
    remaining: Sequence[Sequence[LevelOption]],
    elapsed_s: float,
    bandwidth_bps: float,
    speeds: NodeSpeeds,
    target: StreamTarget,
    tokens_per_chunk: int,
) -> int:
    """Level for ``remaining[0]`` (each entry: the levels held for one chunk, in chunk order), or RECOMPUTE."""
    allowed = [[o for o in chunk if o.quality >= target.min_quality] for chunk in remaining]
    if not remaining or not allowed[0]:
        return RECOMPUTE
    suffix_s = recompute_seconds(target.suffix_tokens, speeds)
    budget_s = (target.slo_s - elapsed_s - suffix_s) / len(remaining)
    # Best quality first; among equals (e.g. raw and lossless: the same values) the one that arrives sooner.
    for option in sorted(allowed[0], key=lambda o: (-o.quality, chunk_seconds(o, bandwidth_bps, speeds))):
        if chunk_seconds(option, bandwidth_bps, speeds) <= budget_s:
            return option.level
    # Nothing fits the even share: take the fastest way to the first token, fetching the smallest levels up to
    # the first chunk that has no allowed level (recomputing from there), or recomputing everything from here.
    fetchable = next((i for i, chunk in enumerate(allowed) if not chunk), len(allowed))
    fetch_s = sum(min(chunk_seconds(o, bandwidth_bps, speeds) for o in chunk) for chunk in allowed[:fetchable])
    fetch_s += recompute_seconds((len(remaining) - fetchable) * tokens_per_chunk, speeds)
    if recompute_seconds(len(remaining) * tokens_per_chunk, speeds) <= fetch_s:
        return RECOMPUTE
    return min(allowed[0], key=lambda o: chunk_seconds(o, bandwidth_bps, speeds)).level
