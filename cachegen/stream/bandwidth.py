"""Online link-throughput estimate from the chunks actually fetched, and in-process link shaping.

The estimate is what the planner believes the next chunk will get. It follows an exponentially weighted mean of
per-chunk throughput but drops at once to a sample below it: under a time-to-first-token target, overrating the
link costs a missed deadline while underrating it costs only some quality.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ThroughputEstimate:
    """Immutable estimate; ``observe`` returns the next one, so plans are reproducible from their inputs."""

    bandwidth_bps: float
    num_samples: int = 0
    alpha: float = 0.5
    """Weight of the newest sample in the mean (affects runtime only)."""

    def observe(self, num_bytes: int, seconds: float) -> ThroughputEstimate:
        sample = 8 * num_bytes / max(seconds, 1e-9)
        if self.num_samples == 0 or sample < self.bandwidth_bps:
            value = sample
        else:
            value = self.alpha * sample + (1 - self.alpha) * self.bandwidth_bps
        return ThroughputEstimate(value, self.num_samples + 1, self.alpha)


@dataclass(frozen=True, slots=True)
class TracePoint:
    """From ``start_s`` (seconds since the trace began) on, the link carries ``bandwidth_bps``."""

    start_s: float
    bandwidth_bps: float


def parse_trace(text: str) -> list[TracePoint]:
    """A bandwidth trace: one ``seconds bandwidth`` pair per line (``0 1gbit``, ``2.5 100mbit``), '#' comments."""
    points = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"trace line {number}: expected 'seconds bandwidth', got {line!r}")
        points.append(TracePoint(float(parts[0]), parse_rate(parts[1])))
    if not points or points[0].start_s != 0:
        raise ValueError("a trace must start at second 0")
    return points


_UNITS = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "bit": 1.0}


def parse_rate(text: str) -> float:
    """'1gbit' -> 1e9 bits/s (tc's spelling; plain numbers are bits/s)."""
    lowered = text.strip().lower()
    for unit, scale in _UNITS.items():
        if lowered.endswith(unit):
            return float(lowered[: -len(unit)]) * scale
    return float(lowered)


class LinkShaper:
    """An in-process link following a bandwidth trace, for machines where `tc` is not allowed.

    Transfers are serialized as on one link: each starts when the previous one has finished and runs at the
    trace's rate at its start (traces change far slower than one chunk takes). The trace's second 0 is the
    first transfer, so an engine's start-up does not use the trace up. ``transfer(n)`` blocks until ``n`` bytes
    have crossed. Thread-safe.
    """

    def __init__(self, trace: Sequence[TracePoint], clock: Callable[[], float] = time.monotonic) -> None:
        self._trace, self._clock = list(trace), clock
        self._lock = threading.Lock()
        self._start: float | None = None
        self._next_free = 0.0

    def rate_at(self, elapsed_s: float) -> float:
        rate = self._trace[0].bandwidth_bps
        for point in self._trace:
            if point.start_s <= elapsed_s:
                rate = point.bandwidth_bps
        return rate

    def reserve(self, num_bytes: int) -> float:
        """Book ``num_bytes`` on the link; returns the clock time when they have arrived."""
        with self._lock:
            now = self._clock()
            if self._start is None:
                self._start = self._next_free = now
            begin = max(now, self._next_free)
            self._next_free = begin + 8 * num_bytes / max(self.rate_at(begin - self._start), 1.0)
            return self._next_free

    def transfer(self, num_bytes: int) -> None:
        delay = self.reserve(num_bytes) - self._clock()
        if delay > 0:
            time.sleep(delay)
