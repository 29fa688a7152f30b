"""The real tc link (root with iproute2; skipped with the reason elsewhere): rates hold, rates change, clean-up.

Loopback traffic between two processes inside the namespace, a few MB each: about a second in all.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.netshape import NetnsLink, TraceFollower, shaped_netns, tc_unavailable_reason
from cachegen.stream.bandwidth import TracePoint

REASON = tc_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"tc link shaping unavailable: {REASON}")

# Sends N bytes from one socket to another on 127.0.0.1 and prints the seconds it took.
TRANSFER = """
import socket, sys, threading, time
n = int(sys.argv[1]); server = socket.create_server(("127.0.0.1", 0))
def send():
    peer, _ = server.accept(); peer.sendall(b"x" * n); peer.close()
threading.Thread(target=send).start()
sock, got, started = socket.create_connection(server.getsockname()), 0, time.perf_counter()
while chunk := sock.recv(1 << 20):
    got += len(chunk)
assert got == n
print(time.perf_counter() - started)
"""


def _transfer_s(link: NetnsLink, num_bytes: int) -> float:
    done = subprocess.run(link.exec_argv([sys.executable, "-c", TRANSFER, str(num_bytes)]), capture_output=True,
                          text=True, check=True, timeout=60)  # fmt: skip
    return float(done.stdout)


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def _qdisc_rate_bps(link: NetnsLink) -> int:
    """The rate the kernel reports for the namespace's root qdisc on lo (e.g. "rate 100Mbit")."""
    argv = ["tc", "-n", link.name, "qdisc", "show", "dev", "lo", "root"]
    words = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()
    text = words[words.index("rate") + 1].lower().removesuffix("bit")
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text[-1:], 1)
    return round(float(text.rstrip("kmg")) * scale)


# Only lower bounds on time: a token bucket cannot pass bytes faster than its rate (plus one bucket), whatever
# the load, while a loaded machine can always make a transfer slower. How close to the rate the link gets is a
# benchmark figure (`cachegen bench stream --shaping tc`), not a test.
def test_the_link_limits_to_its_rate_and_changes_it():
    with shaped_netns(100e6) as link:
        assert link.name in _namespaces()
        assert _qdisc_rate_bps(link) == 100_000_000
        assert _transfer_s(link, 2_500_000) > 0.2 * 0.9  # 20 Mbit at 100 Mbit/s: at least ~0.2 s
        assert link.set_rate(1e9) != link.set_rate(1e9)  # a new qdisc each time (see set_rate)
        assert _qdisc_rate_bps(link) == 1_000_000_000
        assert _transfer_s(link, 25_000_000) > 0.2 * 0.9  # 200 Mbit at 1 Gbit/s
        before = link.lo_bytes()
        _transfer_s(link, 1_000_000)
        assert link.lo_bytes() - before >= 1_000_000
    assert link.name not in _namespaces()


def test_a_trace_is_replayed_on_the_link():
    trace = [TracePoint(0, 1e9), TracePoint(0.1, 100e6)]  # 12.5 MB in the first 0.1 s, then 1.25 MB per 0.1 s
    with shaped_netns(10e9) as link, TraceFollower(link, trace) as follower:
        seconds = _transfer_s(link, 15_000_000)
        assert _qdisc_rate_bps(link) == 100_000_000  # the trace's last rate is in force
    assert [rate.rate_bps for rate in follower.applied] == [1e9, 100e6]
    switched_s = follower.applied[1].at_s
    assert switched_s >= 0.1  # never early (late only under load)
    expected_s = switched_s + (15_000_000 - switched_s * 1e9 / 8) * 8 / 100e6  # fast, then the rest at 100 Mbit/s
    assert seconds > 0.9 * expected_s


def test_the_namespace_is_deleted_on_error():
    with pytest.raises(RuntimeError, match="boom"), shaped_netns(1e9) as link:
        raise RuntimeError("boom")
    assert link.name not in _namespaces()
