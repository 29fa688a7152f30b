"""A real shaped link for benchmarks and tests: a `tc` token bucket (tbf) on the loopback of a network namespace.

Whatever runs inside the namespace (a KV store server and the engine that reads from it) talks over 127.0.0.1
there, so every store byte crosses the namespace's own ``lo``, whose egress is a tbf at the link's rate (DESIGN
§5: ``netem`` is not in this kernel, so there is no added delay or jitter). Nothing leaves loopback: no
interface or address outside 127.0.0.0/8 is made. ``set_rate`` changes the rate at any time (~2 ms) and
`TraceFollower` replays a bandwidth trace in real time. Needs root and iproute2's ``ip`` and ``tc``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, Self

from cachegen.stream.bandwidth import TracePoint

SHAPINGS = ("tc", "inprocess", "auto")
NETNS_PREFIX = "cg-shape-"
MIN_BURST_BYTES = 128 << 10
"""tbf drops any packet larger than its bucket, and a loopback packet can be 64 KiB (GSO): keep a margin."""
BURST_S = 0.001
"""At high rates the bucket holds 1 ms of traffic, so the kernel's timer granularity does not cap the rate."""
MIN_RATE_BPS = 8_000
"""tbf refuses rate 0; a dead link (a trace's ``0``) becomes 1 KB/s, past its first bucket."""
TBF_LATENCY = "20ms"
"""Queue length, as time at the current rate: measured here, loopback TCP then gets the set rate within 1%."""


class ShapingUnavailable(RuntimeError):
    """`tc` shaping cannot run on this machine; ``reason`` says why (not root, no iproute2, netns refused)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"tc link shaping is unavailable: {reason}")
        self.reason = reason


class ShapingCommandFailed(RuntimeError):
    """An ``ip``/``tc`` command failed while shaping was in use."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(f"{' '.join(argv)!r} exited {returncode}: {stderr.strip()}")
        self.argv, self.returncode, self.stderr = list(argv), returncode, stderr


def _run(argv: Sequence[str]) -> None:
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ShapingCommandFailed(argv, done.returncode, done.stderr)


def tbf_args(rate_bps: float) -> list[str]:
    """The tbf qdisc for a link of ``rate_bps`` bits/s (tc counts ``bit`` as bits per second)."""
    rate = max(int(rate_bps), MIN_RATE_BPS)
    burst = max(MIN_BURST_BYTES, int(rate / 8 * BURST_S))
    return ["tbf", "rate", f"{rate}bit", "burst", str(burst), "latency", TBF_LATENCY]


@dataclass(frozen=True, slots=True)
class NetnsLink:
    """A namespace whose ``lo`` is the shaped link. Plain data (JSON-able), so another process can drive it too."""

    name: str
    anchor_pid: int
    """A process that lives in the namespace as long as the link does; its /proc view gives ``lo``'s counters."""

    def set_rate(self, rate_bps: float, current_handle: str = "") -> str:
        """Shape ``lo`` to ``rate_bps``; returns the new qdisc's handle. Pass the handle this returned last time to
        save a ``tc`` call (~2 ms) when following a trace; otherwise the current one is looked up."""
        # A new qdisc every time (under another handle `replace` grafts instead of changing in place): a tbf changed
        # in place while packets were queued stalled for good here (kernel 6.18), with every later packet queued
        # behind. A graft drops what was queued; TCP resends it.
        handle = "2:" if (current_handle or self._root_handle()) == "1:" else "1:"
        _run(["tc", "-n", self.name, "qdisc", "replace", "dev", "lo", "root", "handle", handle, *tbf_args(rate_bps)])
        return handle

    def _root_handle(self) -> str:
        argv = ["tc", "-n", self.name, "qdisc", "show", "dev", "lo", "root"]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ShapingCommandFailed(argv, done.returncode, done.stderr)
        words = done.stdout.split()  # "qdisc tbf 1: root refcnt 2 rate ..." or "qdisc noqueue 0: root ..."
        return words[2] if len(words) > 2 else ""

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace (``ip netns exec`` execs it: the child's pid is the command's)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def lo_bytes(self) -> int:
        """Bytes sent over the namespace's ``lo`` so far (every byte between two processes in it, once)."""
        with open(f"/proc/{self.anchor_pid}/net/dev") as stats:
            for line in stats:
                name, _, counters = line.partition(":")
                if name.strip() == "lo":
                    return int(counters.split()[8])  # the transmit columns start at the 9th
        raise ShapingCommandFailed(["read", f"/proc/{self.anchor_pid}/net/dev"], 1, "no lo line")


def tc_unavailable_reason() -> str | None:
    """Why tc shaping cannot be used here, or None when it can (tries a namespace with a tbf, ~20 ms)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and qdiscs)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found (Debian package iproute2)"
    try:
        with shaped_netns(1e9):
            return None
    except (ShapingUnavailable, ShapingCommandFailed, OSError) as exc:
        return str(exc)


def resolve_shaping(requested: str) -> str:
    """'tc' or 'inprocess' for a requested ``tc|inprocess|auto``; 'tc' raises ShapingUnavailable when it cannot run."""
    if requested not in SHAPINGS:
        raise ValueError(f"shaping must be one of {SHAPINGS}, got {requested!r}")
    if requested == "inprocess":
        return requested
    reason = tc_unavailable_reason()
    if reason is not None and requested == "tc":
        raise ShapingUnavailable(reason)
    return "tc" if reason is None else "inprocess"


def _sweep_stale() -> None:
    """Delete namespaces left by a process of ours that was killed before its clean-up ran."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    for name in (line.split()[0] for line in listing.splitlines() if line.startswith(NETNS_PREFIX)):
        pid = name[len(NETNS_PREFIX) :].split("-")[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


@contextmanager
def shaped_netns(rate_bps: float) -> Iterator[NetnsLink]:
    """A fresh namespace with ``lo`` up and shaped to ``rate_bps``; deleted on exit, also on error.

    Processes started inside it must be stopped by their owner before the block ends: a namespace lives until its
    last process exits, even after its name is deleted.
    """
    if os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("tc")):
        raise ShapingUnavailable("needs root and iproute2's ip and tc")
    _sweep_stale()
    name = f"{NETNS_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    anchor: subprocess.Popen | None = None
    try:
        try:
            _run(["ip", "netns", "add", name])
            _run(["ip", "-n", name, "link", "set", "lo", "up"])
        except ShapingCommandFailed as exc:
            raise ShapingUnavailable(str(exc)) from exc
        anchor = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "infinity"], stdin=subprocess.DEVNULL)
        link = NetnsLink(name, anchor.pid)
        link.set_rate(rate_bps)
        yield link
    finally:
        if anchor is not None:
            anchor.kill()
            anchor.wait()
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


class ShapeableLink(Protocol):
    def set_rate(self, rate_bps: float, current_handle: str = "") -> str: ...

    def lo_bytes(self) -> int: ...


@dataclass(frozen=True, slots=True)
class AppliedRate:
    at_s: float
    """Seconds since the trace's second 0."""
    rate_bps: float


class TraceFollower:
    """Replays a bandwidth trace on a link in real time, on a thread (a context manager).

    The trace's second 0 is when the link has carried ``start_bytes`` more than at ``start()``, as the in-process
    shaper's clock starts at the first transfer: an engine's store lookup and scheduling do not use the trace up.
    The last rate stays after the trace ends. ``applied`` records each change as made.
    """

    def __init__(self, link: ShapeableLink, trace: Sequence[TracePoint], start_bytes: int = 64 << 10,
                 poll_s: float = 0.0005) -> None:  # fmt: skip
        self._link, self._trace, self._start_bytes, self._poll_s = link, list(trace), start_bytes, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="trace-follower", daemon=True)
        self._error: BaseException | None = None
        self.applied: list[AppliedRate] = []

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        self._handle = self._link.set_rate(self._trace[0].bandwidth_bps)
        self._baseline = self._link.lo_bytes()
        self._thread.start()

    def stop(self) -> None:
        """Stop following (the link keeps its current rate); re-raises what failed on the thread."""
        self._stop.set()
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _follow(self) -> None:
        try:
            while self._link.lo_bytes() - self._baseline < self._start_bytes:
                if self._stop.wait(self._poll_s):
                    return
            zero = time.monotonic()
            self.applied.append(AppliedRate(0.0, self._trace[0].bandwidth_bps))
            for point in self._trace[1:]:
                if self._stop.wait(max(0.0, zero + point.start_s - time.monotonic())):
                    return
                self._handle = self._link.set_rate(point.bandwidth_bps, self._handle)
                self.applied.append(AppliedRate(time.monotonic() - zero, point.bandwidth_bps))
        except (ShapingCommandFailed, OSError) as exc:  # surfaced by stop(): a silent follower fakes the trace
            self._error = exc
