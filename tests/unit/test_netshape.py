"""The tc link's pure parts: tbf parameters, the shaping choice, and the trace follower on a fake link."""

from __future__ import annotations

import threading
import time

import pytest

from bench import netshape
from bench.netshape import ShapingCommandFailed, ShapingUnavailable, TraceFollower, resolve_shaping, tbf_args
from cachegen.stream.bandwidth import TracePoint


def _tbf(rate_bps: float) -> dict[str, str]:
    args = tbf_args(rate_bps)
    assert args[0] == "tbf"
    return dict(zip(args[1::2], args[2::2], strict=True))


def test_tbf_bucket_holds_a_loopback_packet_and_a_millisecond_at_high_rates():
    assert _tbf(100e6) == {"rate": "100000000bit", "burst": str(128 << 10), "latency": "20ms"}
    assert _tbf(10e9)["burst"] == str(1_250_000)
    assert _tbf(0)["rate"] == f"{netshape.MIN_RATE_BPS}bit"  # a dead link: tbf refuses rate 0


def test_shaping_choice(monkeypatch: pytest.MonkeyPatch):
    assert resolve_shaping("inprocess") == "inprocess"
    with pytest.raises(ValueError, match="shaping must be one of"):
        resolve_shaping("netem")
    monkeypatch.setattr(netshape, "tc_unavailable_reason", lambda: "needs root")
    assert resolve_shaping("auto") == "inprocess"
    with pytest.raises(ShapingUnavailable, match="needs root") as raised:
        resolve_shaping("tc")
    assert raised.value.reason == "needs root"
    monkeypatch.setattr(netshape, "tc_unavailable_reason", lambda: None)
    assert resolve_shaping("auto") == "tc"


class FakeLink:
    """Counts bytes when told to and records each rate set, with the time."""

    def __init__(self) -> None:
        self.num_bytes = 0
        self.rates: list[tuple[float, float]] = []
        self.lock = threading.Lock()
        self.fail_after: int | None = None
        """Rate changes that succeed before every later one fails (None: all succeed)."""

    def set_rate(self, rate_bps: float, current_handle: str = "") -> str:
        if self.fail_after is not None and len(self.rates) >= self.fail_after:
            raise ShapingCommandFailed(["tc"], 2, "RTNETLINK answers: No such device")
        with self.lock:
            self.rates.append((time.monotonic(), rate_bps))
        return f"{len(self.rates)}:"

    def lo_bytes(self) -> int:
        return self.num_bytes


TRACE = [TracePoint(0, 1e9), TracePoint(0.05, 2e6), TracePoint(0.1, 3e6)]
LATE = 600.0
"""A trace point no test run reaches: what must not be applied stays unapplied however slow the machine is."""


def _wait_for(condition, timeout_s: float = 30.0) -> None:
    """Conditions, not sleeps: a loaded machine delays the follower's thread, it does not change what it does."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the trace follower made no progress"
        time.sleep(0.005)


def test_trace_starts_at_the_first_bytes_and_is_followed_in_order():
    link = FakeLink()
    with TraceFollower(link, TRACE, start_bytes=1000, poll_s=0.001) as follower:
        link.num_bytes = 999  # a lookup's worth: not yet the transfer
        time.sleep(0.08)
        assert link.rates[1:] == [] and follower.applied == []
        zero = time.monotonic()
        link.num_bytes = 5000
        _wait_for(lambda: len(follower.applied) == 3)
    assert [rate for _, rate in link.rates] == [1e9, 2e6, 3e6]
    assert [rate.rate_bps for rate in follower.applied] == [1e9, 2e6, 3e6]
    for (at, _), point in zip(link.rates[1:], TRACE[1:], strict=True):
        assert at - zero >= point.start_s  # never early (late only as far as the machine is slow)


def test_stopping_before_the_trace_ends_leaves_the_current_rate():
    link = FakeLink()
    trace = [TracePoint(0, 1e9), TracePoint(0.05, 2e6), TracePoint(LATE, 3e6)]
    with TraceFollower(link, trace, start_bytes=0, poll_s=0.001) as follower:
        _wait_for(lambda: len(follower.applied) == 2)
    assert [rate for _, rate in link.rates] == [1e9, 2e6]  # stop() returned: the late point never comes


def test_a_failed_rate_change_is_raised_not_hidden():
    link = FakeLink()
    link.fail_after = 1  # the first rate (set by start) succeeds; the trace's next change fails
    follower = TraceFollower(link, TRACE, start_bytes=0, poll_s=0.001)
    follower.start()
    _wait_for(lambda: not follower._thread.is_alive())
    with pytest.raises(ShapingCommandFailed, match="No such device"):
        follower.stop()
