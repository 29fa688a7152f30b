"""Worker side of the connector: moves chunks between the store and the engine's paged cache.

Loads run in the engine's step (sync) or on a loader thread (async: the scheduler keeps the request waiting
until ``take_finished_loads`` reports it). Saves copy the KV out during the step, so the engine may free the
blocks at once; encoding and writing continue on a saver thread. No error ever reaches the engine: a chunk
that cannot be loaded has its blocks reported as failed, and vLLM recomputes from there.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from cachegen.connector.paged import PagedKV, layer_order, slots_for
from cachegen.connector.plan import ChunkSpan, TransferJob
from cachegen.errors import CacheGenError
from cachegen.store import KVStore
from cachegen.stream.fetch import ChunkCodec, fetch_chunk, store_chunk

log = logging.getLogger(__name__)


def _layer_writer(layer: Any):
    """The engine's own cache-write op for one attention layer (vLLM's ``AttentionImpl.do_kv_cache_update``)."""

    def write(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
        layer.impl.do_kv_cache_update(layer, key, value, cache, slots)

    return write


class ConnectorWorker:
    def __init__(self, store: KVStore, chunk_codec: ChunkCodec, block_size: int) -> None:
        self._store, self._codec, self._block_size = store, chunk_codec, block_size
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
            self._failed_blocks |= self._load_job(job)
            return
        future = self._loader.submit(self._load_job, job)
        future.add_done_callback(lambda done, request_id=job.request_id: self._load_done(request_id, done))

    def _load_done(self, request_id: str, future: Future) -> None:
        with self._lock:
            self._failed_by_request[request_id] = future.result()
            self._finished_loads.add(request_id)

    def _load_job(self, job: TransferJob) -> set[int]:
        """Load every span of a job; returns the block ids that could not be filled."""
        failed: set[int] = set()
        num_loaded = 0
        for span in job.spans:
            if not failed and self._load_span(job.request_id, span):
                num_loaded += 1
                continue
            # vLLM recomputes from the first failed block on, so later chunks are not worth loading.
            failed.update(span.block_ids[span.first_token // self._block_size :])
        log.info(
            "kv loaded request=%s chunks=%d failed_chunks=%d",
            job.request_id, num_loaded, len(job.spans) - num_loaded,
        )
        return failed

    def _load_span(self, request_id: str, span: ChunkSpan) -> bool:
        try:
            kv = fetch_chunk(self._store, span.key, self._codec)
            slots = slots_for(span.block_ids, self._block_size, span.first_token)
            self._paged.write(kv[:, :, :, span.first_token :], slots)
            return True
        except CacheGenError as exc:
            log.warning("chunk load failed, recomputing request=%s chunk=%d error=%s", request_id, span.index, exc)
        except Exception:  # a bug must cost a recompute, never the engine
            log.exception("chunk load crashed, recomputing request=%s chunk=%d", request_id, span.index)
        return False

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

    def flush(self) -> None:
        """Wait until every queued save is in the store."""
        self._saver.submit(lambda: None).result()

    def close(self) -> None:
        self._loader.shutdown(wait=True)
        self._saver.shutdown(wait=True)
