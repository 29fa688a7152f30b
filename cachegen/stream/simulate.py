"""Replay the planner over a bandwidth trace without a network: decisions, time to first token, SLO met.

Used by the planner's unit tests and by ``cachegen bench stream --trace`` to report violation rates and level
mixes over many traces. Time is simulated: transfers integrate the trace's rate exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cachegen.stream.bandwidth import ThroughputEstimate, TracePoint
from cachegen.stream.policy import RECOMPUTE, LevelOption, NodeSpeeds, StreamTarget, choose, recompute_seconds


@dataclass(frozen=True, slots=True)
class StreamOutcome:
    levels: tuple[int, ...]
    """Level fetched per chunk, RECOMPUTE for each chunk prefilled from text."""
    ttft_s: float
    bytes_fetched: int
    is_slo_met: bool


def transfer_end(trace: Sequence[TracePoint], start_s: float, num_bytes: int) -> float:
    """When ``num_bytes`` started at ``start_s`` have crossed a link following ``trace``."""
    bits = 8.0 * num_bytes
    now = start_s
    for i, point in enumerate(trace):
        end = trace[i + 1].start_s if i + 1 < len(trace) else float("inf")
        if end <= now:
            continue
        rate = point.bandwidth_bps
        if rate > 0 and bits <= rate * (end - now):
            return now + bits / rate
        bits -= rate * (end - now)
        now = end
    return float("inf")  # the trace ends in a dead link


def simulate(
    chunks: Sequence[Sequence[LevelOption]],
    trace: Sequence[TracePoint],
    speeds: NodeSpeeds,
    target: StreamTarget,
    tokens_per_chunk: int,
    prior_bps: float,
) -> StreamOutcome:
    """Plan and 'fetch' every chunk in order; chunks after a RECOMPUTE decision are prefilled with the suffix."""
    estimate = ThroughputEstimate(prior_bps)
    now, fetched_bytes, levels = 0.0, 0, []
    decode_done = 0.0
    for index in range(len(chunks)):
        level = choose(chunks[index:], now, estimate.bandwidth_bps, speeds, target, tokens_per_chunk)
        if level == RECOMPUTE:
            levels += [RECOMPUTE] * (len(chunks) - index)
            break
        size = next(o.size_bytes for o in chunks[index] if o.level == level)
        arrived = transfer_end(trace, now, size)
        estimate = estimate.observe(size, arrived - now)
        decode_done = max(decode_done, arrived) + size / speeds.decode_rate(level)
        now, fetched_bytes = arrived, fetched_bytes + size
        levels.append(level)
    num_recomputed = levels.count(RECOMPUTE)
    prefill_s = recompute_seconds(num_recomputed * tokens_per_chunk + target.suffix_tokens, speeds)
    ttft = max(now, decode_done) + prefill_s
    return StreamOutcome(tuple(levels), ttft, fetched_bytes, ttft <= target.slo_s)
