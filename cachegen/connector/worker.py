"""Worker side of the connector: moves chunks between the store and the engine's paged cache.

Loads stream through ``cachegen.stream.Streamer`` (level per chunk, fetch overlapped with decode and injection),
in the engine's step (sync) or on a loader thread (async: the scheduler keeps the request waiting until
``take_finished_loads`` reports it). Saves copy the KV out during the step, so the engine may free the blocks
at once; encoding and writing continue on a saver thread. No error ever reaches the engine: the blocks of every
chunk that was not injected are reported as failed, and vLLM recomputes from the first of them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from cachegen import obs
from cachegen.connector.paged import PagedKV, layer_order, slots_for
from cachegen.connector.plan import ChunkSpan, TransferJob
from cachegen.errors import CacheGenError
from cachegen.store import KVStore
from cachegen.stream.fetch import ChunkCodec, store_chunk
from cachegen.stream.policy import StreamTarget
from cachegen.stream.streamer import StreamChunk, Streamer, StreamReport

log = logging.getLogger(__name__)


def _layer_writer(layer: Any):
    """The engine's own cache-write op for one attention layer (vLLM's ``AttentionImpl.do_kv_cache_update``)."""

    def write(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
        layer.impl.do_kv_cache_update(layer, key, value, cache, slots)

    return write


def _count(report: StreamReport, num_chunks: int) -> None:
    for level in report.levels[: report.num_injected]:
        obs.CONNECTOR_LOADED_CHUNKS.labels(level=str(level)).inc()
    for level, size in report.bytes_by_level.items():
        obs.CONNECTOR_FETCHED_BYTES.labels(level=str(level)).inc(size)
    if num_chunks > report.num_injected:
        obs.CONNECTOR_FALLBACK_CHUNKS.labels(reason=report.stop_kind or "decode").inc(num_chunks - report.num_injected)


class ConnectorWorker:
    def __init__(self, store: KVStore, chunk_codec: ChunkCodec, streamer: Streamer, block_size: int) -> None:
        self._store, self._codec, self._streamer, self._block_size = store, chunk_codec, streamer, block_size
        self._paged: PagedKV | None = None
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="cachegen-load")
        self._saver = ThreadPoolExecutor(1, thread_name_prefix="cachegen-save")
        self._lock = threading.Lock()
        self._finished_loads: set[str] = set()
        self._failed_by_request: dict[str, set[int]] = {}
        self._failed_blocks: set[int] = set()

    def attach(self, kv_caches: Mapping[str, torch.Tensor], layers: Mapping[str, Any]) -> None:
        """Bind to the engine's paged caches (one per attention layer) and learn their geometry."""
        names = layer_order(list(kv_caches))
        writers = [_layer_writer(layers[name]) for name in names]
        self._paged = PagedKV(self._codec.layout, [kv_caches[name] for name in names], writers, self._block_size)
        log.info("paged KV attached layers=%d block_size=%d", len(names), self._block_size)

    def load(self, job: TransferJob, is_async: bool) -> None:
        if not is_async:
            failed = self._load_job(job)
            with self._lock:
                self._failed_blocks |= failed
            return
        future = self._loader.submit(self._load_job, job)
        future.add_done_callback(lambda done, request_id=job.request_id: self._load_done(request_id, done))

    def _load_done(self, request_id: str, future: Future) -> None:
        with self._lock:
            self._failed_by_request[request_id] = future.result()
            self._finished_loads.add(request_id)

    def _load_job(self, job: TransferJob) -> set[int]:
        """Stream a job's spans into the cache; returns the blocks of every span that was not injected."""
        chunks = [StreamChunk(span.key, dict(span.levels)) for span in job.spans]
        target = StreamTarget(job.slo_s, job.min_quality, job.suffix_tokens)

        def inject(position: int, kv: torch.Tensor) -> None:
            span = job.spans[position]
            self._paged.write(
                kv[:, :, :, span.first_token :], slots_for(span.block_ids, self._block_size, span.first_token)
            )

        try:
            report = self._streamer.run(chunks, target, inject)
        except Exception:  # a bug must cost a recompute, never the engine
            log.exception("stream crashed, recomputing request=%s", job.request_id)
            return self._blocks_from(job.spans, 0)
        log.info(
            "kv loaded request=%s chunks=%d failed_chunks=%d levels=%s bytes=%d ms=%.1f%s",
            job.request_id,
            report.num_injected,
            len(job.spans) - report.num_injected,
            report.levels,
            report.bytes_fetched,
            1e3 * report.fetch_s,
            f" stop={report.stop_reason!r}" if report.stop_reason else "",
        )
        _count(report, len(job.spans))
        return self._blocks_from(job.spans, report.num_injected)

    def _blocks_from(self, spans: tuple[ChunkSpan, ...], first: int) -> set[int]:
        return {b for span in spans[first:] for b in span.block_ids[span.first_token // self._block_size :]}

    def save(self, job: TransferJob) -> None:
        """Copy each span's KV out of the cache now; encode and store it on the saver thread."""
        for span in job.spans:
            kv = self._paged.read(span.block_ids)
            self._saver.submit(self._save_span, job.request_id, span, kv)

    def _save_span(self, request_id: str, span: ChunkSpan, kv: torch.Tensor) -> None:
        try:
            size = store_chunk(self._store, span.key, kv, self._codec)
            log.debug("chunk saved request=%s chunk=%d bytes=%d", request_id, span.index, size)
        except CacheGenError as exc:
            log.warning("chunk save failed request=%s chunk=%d error=%s", request_id, span.index, exc)
        except Exception:
            log.exception("chunk save crashed request=%s chunk=%d", request_id, span.index)

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        self._streamer.observe_prefill(num_tokens, seconds)

    def take_finished_loads(self) -> set[str]:
        """Requests whose async load ended since the last call; their failed blocks become reportable now."""
        with self._lock:
            finished, self._finished_loads = self._finished_loads, set()
            for request_id in finished:
                self._failed_blocks |= self._failed_by_request.pop(request_id, set())
        return finished

    def take_failed_blocks(self) -> set[int]:
        with self._lock:
            failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def close(self) -> None:
        self._loader.shutdown(wait=True)
        self._saver.shutdown(wait=True)
