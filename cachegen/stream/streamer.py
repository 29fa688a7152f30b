"""Stream a cached prefix into the engine: plan each chunk's level, fetch, decode and inject, pipelined.

The calling thread plans and fetches chunk i+1 while a decode thread decodes and injects chunk i. The stream
stops at the first chunk that is planned as RECOMPUTE, cannot be fetched or decoded, or fails to inject: the
engine recomputes from there. The report says how many leading chunks are in the engine's cache.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from cachegen.errors import CacheGenError
from cachegen.spec import ChunkKey, level_quality
from cachegen.store import KVStore
from cachegen.stream.bandwidth import LinkShaper, ThroughputEstimate
from cachegen.stream.fetch import ChunkCodec, decode_chunk
from cachegen.stream.policy import RECOMPUTE, LevelOption, NodeSpeeds, StreamTarget, choose

log = logging.getLogger(__name__)

Sink = Callable[[int, torch.Tensor], None]
"""(position of the chunk in the stream, decoded KV) -> None; raises to stop the stream."""


@dataclass(frozen=True, slots=True)
class StreamChunk:
    key: ChunkKey
    levels: dict[int, int]
    """Level id -> stored size in bytes, from the store's lookup."""

    def options(self) -> list[LevelOption]:
        return [LevelOption(level, size, level_quality(level)) for level, size in self.levels.items()]


@dataclass(slots=True)
class StreamReport:
    num_injected: int = 0
    """Leading chunks now in the engine's cache; the engine recomputes every chunk after them."""
    levels: list[int] = field(default_factory=list)
    bytes_fetched: int = 0
    bytes_by_level: dict[int, int] = field(default_factory=dict)
    fetch_s: float = 0.0
    stop_reason: str = ""
    stop_kind: str = ""
    """Why chunks were left to recompute: "slo" (planned), "fetch" (missing or store down), "decode" (rejected)."""


class Streamer:
    """Fetches prefixes for one engine. Keeps the throughput estimate and decode speed across requests."""

    def __init__(self, store: KVStore, chunk_codec: ChunkCodec, speeds: NodeSpeeds, prior_bps: float,
                 shaper: LinkShaper | None = None) -> None:  # fmt: skip
        self._store, self._codec, self._shaper = store, chunk_codec, shaper
        self._lock = threading.Lock()
        self._estimate = ThroughputEstimate(prior_bps)
        self.speeds = speeds

    def run(self, chunks: Sequence[StreamChunk], target: StreamTarget, sink: Sink) -> StreamReport:
        """Stream ``chunks`` (a prompt's leading cached chunks, in order) into ``sink``. Blocks until done."""
        report = StreamReport()
        decoded: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()
        worker = threading.Thread(target=self._decode_loop, args=(decoded, sink, report, stop), daemon=True)
        worker.start()
        started = time.perf_counter()
        try:
            self._fetch_loop(chunks, target, decoded, report, stop, started)
        finally:
            decoded.put(None)
            worker.join()
        report.fetch_s = time.perf_counter() - started
        return report

    def _fetch_loop(self, chunks, target, decoded, report, stop, started) -> None:
        options = [chunk.options() for chunk in chunks]
        for position, chunk in enumerate(chunks):
            if stop.is_set():
                return
            with self._lock:
                bandwidth = self._estimate.bandwidth_bps
            elapsed = time.perf_counter() - started
            level = choose(
                options[position:], elapsed, bandwidth, self.speeds, target, self._codec.layout.tokens_per_chunk
            )
            if level == RECOMPUTE:
                report.stop_reason = report.stop_reason or f"planned recompute from chunk {position}"
                report.stop_kind = report.stop_kind or "slo"
                return
            data = self._fetch(chunk.key, level, report)
            if data is None:
                return
            report.levels.append(level)
            decoded.put((position, level, data))

    def _fetch(self, key: ChunkKey, level: int, report: StreamReport) -> bytes | None:
        fetch_started = time.perf_counter()
        try:
            data = self._store.get(ChunkKey(key.model_id, key.layout_digest, key.prefix_hash, key.chunk_index, level))
        except CacheGenError as exc:
            report.stop_reason, report.stop_kind = f"fetch of chunk {key.chunk_index} failed: {exc}", "fetch"
            log.warning("chunk fetch failed, recomputing chunk=%d level=%d error=%s", key.chunk_index, level, exc)
            return None
        if self._shaper is not None:
            self._shaper.transfer(len(data))
        with self._lock:
            self._estimate = self._estimate.observe(len(data), time.perf_counter() - fetch_started)
        report.bytes_fetched += len(data)
        report.bytes_by_level[level] = report.bytes_by_level.get(level, 0) + len(data)
        return data

    def _decode_loop(self, decoded: queue.Queue, sink: Sink, report: StreamReport, stop: threading.Event) -> None:
        while (item := decoded.get()) is not None:
            if stop.is_set():
                continue  # drain what the fetch loop already queued
            position, level, data = item
            try:
                started = time.perf_counter()
                sink(position, decode_chunk(data, self._codec))
                self._observe_decode(level, len(data), time.perf_counter() - started)
                report.num_injected = position + 1
            except CacheGenError as exc:
                self._stop(report, stop, f"chunk {position} rejected: {exc}")
            except Exception as exc:  # a bug must cost a recompute, never the engine
                log.exception("chunk decode/inject crashed position=%d", position)
                self._stop(report, stop, f"chunk {position} crashed: {exc!r}")

    @staticmethod
    def _stop(report: StreamReport, stop: threading.Event, reason: str) -> None:
        log.warning("stream stopped, recomputing the rest: %s", reason)
        report.stop_reason, report.stop_kind = reason, "decode"
        stop.set()

    def _observe_decode(self, level: int, num_bytes: int, seconds: float) -> None:
        with self._lock:
            self.speeds = self.speeds.with_decode(level, num_bytes / max(seconds, 1e-9))

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        """The engine prefilled ``num_tokens`` in ``seconds``: the measured price of recomputing."""
        if num_tokens < 64 or seconds <= 0:
            return  # decode steps and tiny prefills say little about prefill speed
        with self._lock:
            rate = num_tokens / seconds
            prefill = 0.5 * rate + 0.5 * self.speeds.prefill_tokens_per_s
            self.speeds = NodeSpeeds(self.speeds.decode_bytes_per_s, prefill, self.speeds.decode_by_level)
