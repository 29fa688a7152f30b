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


def test_the_link_carries_its_rate_and_changes_it():
    with shaped_netns(100e6) as link:
        assert link.name in _namespaces()
        assert 0.2 * 0.9 < _transfer_s(link, 2_500_000) < 0.2 * 1.25  # 20 Mbit at 100 Mbit/s
        assert link.set_rate(1e9) != link.set_rate(1e9)  # a new qdisc each time (see set_rate)
        assert 0.2 * 0.9 < _transfer_s(link, 25_000_000) < 0.2 * 1.25  # 200 Mbit at 1 Gbit/s
        before = link.lo_bytes()
        _transfer_s(link, 1_000_000)
        assert link.lo_bytes() - before >= 1_000_000
    assert link.name not in _namespaces()


def test_a_trace_is_replayed_on_the_link():
    trace = [TracePoint(0, 1e9), TracePoint(0.1, 100e6)]  # 12.5 MB in the first 0.1 s, then 1.25 MB per 0.1 s
    with shaped_netns(10e9) as link, TraceFollower(link, trace) as follower:
        seconds = _transfer_s(link, 15_000_000)
    assert [rate.rate_bps for rate in follower.applied] == [1e9, 100e6]
    switched_s = follower.applied[1].at_s  # on time, give or take the poll and a tc process (slower under load)
    assert 0.1 <= switched_s < 0.15
    expected_s = switched_s + (15_000_000 - switched_s * 1e9 / 8) * 8 / 100e6  # ~0.3 s: fast, then 2.5 MB slow
    # The switch drops what the old qdisc held (see NetnsLink.set_rate): allow TCP one loss recovery.
    assert 0.9 * expected_s < seconds < expected_s + 0.3


def test_the_namespace_is_deleted_on_error():
    with pytest.raises(RuntimeError, match="boom"), shaped_netns(1e9) as link:
        raise RuntimeError("boom")
    assert link.name not in _namespaces()
