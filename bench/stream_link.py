"""Where a `cachegen bench stream` measuring engine reads the stored context from, and how its link is shaped.

``tc``: a real `cachegen store serve` process over the populated disk store runs inside a network namespace whose
``lo`` is a tbf at the bandwidth under test (`bench.netshape`); the measuring engine runs in the same namespace
and fetches over gRPC on 127.0.0.1, so every byte crosses the shaped link. ``inprocess``: the engine reads the
disk store directly and its connector's token bucket (``stream.shape_trace``) paces each read.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.netshape import NetnsLink, shaped_netns
from cachegen.stream.bandwidth import parse_rate

STORE_START_TIMEOUT_S = 60


@dataclass(frozen=True, slots=True)
class PhaseLink:
    shaping: str
    """'tc' or 'inprocess' (recorded with every result row)."""
    store_url: str
    """What the measuring engine's store setting is."""
    netns: NetnsLink | None = None
    """tc only: the namespace the engine runs in; its ``lo`` is the shaped link."""

    def argv(self, argv: Sequence[str]) -> list[str]:
        return self.netns.exec_argv(argv) if self.netns else list(argv)

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        # Inside the namespace there is no route off loopback; vLLM would otherwise guess its own address by
        # routing to a public one, fail, and fall back to 0.0.0.0.
        return {**base, "VLLM_HOST_IP": "127.0.0.1"} if self.netns else dict(base)

    def engine_shape(self, bandwidth: str) -> str:
        """The engine's in-process shaping setting: the rate or trace file, or none when tc shapes the link."""
        return "" if self.netns else bandwidth

    def set_rate(self, bandwidth: str) -> None:
        if self.netns is not None:
            self.netns.set_rate(parse_rate(bandwidth))


@contextmanager
def phase_link(shaping: str, store_url: str, work: Path) -> Iterator[PhaseLink]:
    """The link for one shaping over the populated ``store_url`` (``disk://``); cleans up on exit and on error."""
    if shaping == "inprocess":
        yield PhaseLink("inprocess", store_url)
        return
    with shaped_netns(10e9) as netns:
        ready = work / f"store-ready-{netns.name}"
        argv = [sys.executable, "-m", "server.cli", "store", "serve", "--listen", "127.0.0.1:0", "--backend",
                store_url, "--no-auth", "--ready-file", str(ready)]  # fmt: skip
        with open(work / f"store-{netns.name}.log", "w") as log:
            store = subprocess.Popen(netns.exec_argv(argv), stdout=log, stderr=subprocess.STDOUT)
        try:
            yield PhaseLink("tc", f"grpc://{_wait_ready(store, ready)}", netns)
        finally:
            store.terminate()
            try:
                store.wait(timeout=10)
            except subprocess.TimeoutExpired:
                store.kill()
                store.wait()


def _wait_ready(store: subprocess.Popen, ready: Path) -> str:
    deadline = time.monotonic() + STORE_START_TIMEOUT_S
    while not ready.exists():
        if store.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the store inside the shaped namespace did not start (exit {store.poll()})")
        time.sleep(0.05)
    return ready.read_text().strip()
