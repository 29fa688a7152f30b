"""The planner on scripted bandwidth traces: drops, spikes, a dead link."""

from __future__ import annotations

import pytest

from cachegen.spec import level_quality
from cachegen.stream.bandwidth import LinkShaper, ThroughputEstimate, TracePoint, parse_rate, parse_trace
from cachegen.stream.policy import RECOMPUTE, LevelOption, NodeSpeeds, StreamTarget, choose
from cachegen.stream.simulate import simulate, transfer_end

TOKENS = 256
# Sizes of one 256-token SmolLM2 chunk: bf16-lossless-ish, 8-bit, ~3 and ~2 bits/value.
LEVELS = (
    LevelOption(1, 5_000_000, 4),
    LevelOption(2, 2_950_000, 3),
    LevelOption(3, 1_100_000, 2),
    LevelOption(4, 740_000, 1),
)
SPEEDS = NodeSpeeds(decode_bytes_per_s=400e6, prefill_tokens_per_s=1000.0)
CHUNKS = [LEVELS] * 32  # an 8K-token context


def _trace(*points: tuple[float, float]) -> list[TracePoint]:
    return [TracePoint(t, bps) for t, bps in points]


def test_fast_link_gets_the_best_level_everywhere():
    outcome = simulate(CHUNKS, _trace((0, 10e9)), SPEEDS, StreamTarget(slo_s=1.0), TOKENS, prior_bps=10e9)
    assert set(outcome.levels) == {1} and outcome.is_slo_met


def test_slow_link_steps_down_to_smaller_levels():
    outcome = simulate(CHUNKS, _trace((0, 100e6)), SPEEDS, StreamTarget(slo_s=3.0), TOKENS, prior_bps=100e6)
    assert outcome.is_slo_met
    assert max(outcome.levels) >= 3 and RECOMPUTE not in outcome.levels


def test_a_drop_mid_stream_changes_the_level():
    trace = _trace((0, 2e9), (0.3, 50e6))
    outcome = simulate(CHUNKS, trace, SPEEDS, StreamTarget(slo_s=2.0), TOKENS, prior_bps=2e9)
    first, last = outcome.levels[0], [lvl for lvl in outcome.levels if lvl != RECOMPUTE][-1]
    assert first == 1 and last > first  # started at the best level, finished on a smaller one (or text)


def test_a_spike_is_used_but_a_drop_is_believed_at_once():
    estimate = ThroughputEstimate(1e9).observe(125_000_000, 1.0)  # 1 Gbit/s sample
    assert estimate.observe(125_000_000, 0.1).bandwidth_bps < 10e9  # spike: only averaged in
    assert estimate.observe(1_250_000, 1.0).bandwidth_bps == pytest.approx(10e6)  # drop: taken at once


def test_dead_link_recomputes_instead_of_waiting():
    trace = _trace((0, 1e9), (0.05, 0.0))
    outcome = simulate(CHUNKS, trace, SPEEDS, StreamTarget(slo_s=10.0), TOKENS, prior_bps=1e9)
    assert RECOMPUTE in outcome.levels
    assert choose(CHUNKS, 0.0, 1.0, SPEEDS, StreamTarget(slo_s=10.0), TOKENS) == RECOMPUTE


def test_quality_floor_is_respected():
    target = StreamTarget(slo_s=0.5, min_quality=3)
    outcome = simulate(CHUNKS, _trace((0, 100e6)), SPEEDS, target, TOKENS, prior_bps=100e6)
    assert all(level in (1, 2, RECOMPUTE) for level in outcome.levels)


def test_decisions_are_deterministic():
    trace = _trace((0, 1e9), (0.2, 80e6), (0.6, 3e9))
    runs = {simulate(CHUNKS, trace, SPEEDS, StreamTarget(slo_s=1.5), TOKENS, 1e9) for _ in range(3)}
    assert len(runs) == 1


def test_suffix_prefill_is_budgeted():
    relaxed = choose(CHUNKS, 0.0, 1e9, SPEEDS, StreamTarget(slo_s=2.0), TOKENS)
    tight = choose(CHUNKS, 0.0, 1e9, SPEEDS, StreamTarget(slo_s=2.0, suffix_tokens=1500), TOKENS)
    assert tight > relaxed  # less time left for the prefix: a smaller (higher-numbered) level


def test_transfer_integrates_the_trace():
    trace = _trace((0, 8e6), (1, 16e6))  # 1 MB/s, then 2 MB/s
    assert transfer_end(trace, 0.0, 3_000_000) == pytest.approx(2.0)
    assert transfer_end(_trace((0, 8e6), (1, 0.0)), 0.0, 2_000_000) == float("inf")


def test_trace_and_rate_parsing():
    assert parse_rate("1gbit") == 1e9 and parse_rate("100mbit") == 1e8 and parse_rate("5000") == 5000
    assert parse_trace("# t rate\n0 1gbit\n2.5 100mbit\n") == _trace((0, 1e9), (2.5, 1e8))
    with pytest.raises(ValueError):
        parse_trace("1 1gbit\n")


def test_shaper_serializes_transfers_at_the_trace_rate():
    clock = iter([0.0, 0.0, 0.0, 0.5]).__next__
    shaper = LinkShaper(_trace((0, 8e6)), clock=clock)  # 1 MB/s
    assert shaper.reserve(1_000_000) == pytest.approx(1.0)
    assert shaper.reserve(500_000) == pytest.approx(1.5)  # queued behind the first


def test_shaper_replays_the_trace_from_the_first_transfer():
    now = [0.0]
    shaper = LinkShaper(_trace((0, 8e6), (0.5, 4e6)), clock=lambda: now[0])  # built during an engine's start-up
    now[0] = 100.0
    assert shaper.reserve(1_000_000) == pytest.approx(101.0)  # trace second 0: 1 MB/s
    assert shaper.reserve(1_000_000) == pytest.approx(103.0)  # begins at trace second 1: 0.5 MB/s


def test_a_slow_decoding_level_loses_to_a_fast_one_on_a_fast_link():
    raw, lossless = LevelOption(0, 5_900_000, level_quality(0)), LevelOption(1, 3_900_000, level_quality(1))
    assert raw.quality == lossless.quality  # the same values: only time decides between them
    chunks = [[raw, lossless]] * 32
    unmeasured = NodeSpeeds(decode_bytes_per_s=300e6, prefill_tokens_per_s=1000.0)
    assert choose(chunks, 0.0, 10e9, unmeasured, StreamTarget(slo_s=2.0), TOKENS) == 1  # fewer bytes to decode
    measured = unmeasured.with_decode(1, 46e6)  # entropy decoding on a CPU core: ~85 ms per chunk
    assert measured.decode_rate(1) == pytest.approx(46e6) and measured.decode_rate(0) == 300e6
    assert choose(chunks, 0.0, 10e9, measured, StreamTarget(slo_s=2.0), TOKENS) == 0  # raw is a copy: sooner
    assert choose(chunks, 0.0, 100e6, measured, StreamTarget(slo_s=20.0), TOKENS) == 1  # slow link: fewer bytes


def test_decode_measurements_are_averaged_per_level():
    speeds = NodeSpeeds(300e6, 1000.0).with_decode(1, 40e6).with_decode(1, 60e6).with_decode(0, 900e6)
    assert speeds.decode_rate(1) == pytest.approx(50e6) and speeds.decode_rate(0) == pytest.approx(900e6)
    assert speeds.decode_rate(4) == 300e6  # never measured: the prior
