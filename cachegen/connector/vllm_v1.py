"""vLLM v1 KV connector: saves prompt chunks to the cachegen store and loads the longest cached prefix back.

The only module that imports vLLM. Load it with::

    kv_transfer_config={"kv_connector": "CacheGenConnector",
                        "kv_connector_module_path": "cachegen.connector.vllm_v1",
                        "kv_role": "kv_both",
                        "kv_connector_extra_config": {"store": {...}, "codec": {...}, "stream": {...}}}

vLLM builds two instances: the scheduler side (in the engine core: lookups, block bookkeeping, the per-step plan)
and the worker side (next to the paged cache: loads and saves). They share only the store and the plan.
Per request: ``cache_salt`` is the tenant; ``kv_transfer_params={"cachegen": {...}}`` carries the request's
knobs: ``load``/``save`` (bool) switch loading or saving off, ``slo_ms`` is the time-to-first-token target of
the load, ``min_quality`` a floor on ``cachegen.spec.level_quality``, ``levels`` the level ids it may fetch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from cachegen.codec import default_tables_path, load_tables
from cachegen.config import CodecSettings, StoreSettings, StreamSettings
from cachegen.connector.plan import RequestState, TransferJob, load_spans, num_loadable_chunks, save_spans
from cachegen.connector.worker import ConnectorWorker
from cachegen.errors import CacheGenError, LayoutMismatch
from cachegen.model import model_fingerprint
from cachegen.spec import LEVEL_BY_NAME, KVLayout, chunk_keys
from cachegen.store import open_store
from cachegen.stream.bandwidth import LinkShaper, TracePoint, parse_rate, parse_trace
from cachegen.stream.fetch import ChunkCodec
from cachegen.stream.policy import NodeSpeeds
from cachegen.stream.streamer import Streamer

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput

log = logging.getLogger(__name__)


@dataclass
class CacheGenMetadata(KVConnectorMetadata):
    """What the worker does this step; built by the scheduler side once per step."""

    loads: list[TransferJob] = field(default_factory=list)
    saves: list[TransferJob] = field(default_factory=list)
    num_scheduled_tokens: int = 0


def _layout_of(vllm_config: Any, tokens_per_chunk: int) -> KVLayout:
    model_config, parallel = vllm_config.model_config, vllm_config.parallel_config
    if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
        raise LayoutMismatch("the cachegen connector supports one worker (tensor and pipeline parallel size 1)")
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype not in ("auto", None):
        raise LayoutMismatch(f"the cachegen connector needs an unquantized KV cache, got cache_dtype={cache_dtype}")
    block_size = vllm_config.cache_config.block_size
    if tokens_per_chunk % block_size:
        raise LayoutMismatch(f"tokens_per_chunk={tokens_per_chunk} must be a multiple of the block size {block_size}")
    return KVLayout(
        num_layers=model_config.get_num_layers(parallel),
        num_kv_heads=model_config.get_num_kv_heads(parallel),
        head_dim=model_config.get_head_size(),
        dtype=str(model_config.dtype).removeprefix("torch."),
        tokens_per_chunk=tokens_per_chunk,
    )


def _log_through_vllm() -> None:
    """Inside vLLM's processes, send cachegen's log records to vLLM's own handlers (else they are lost)."""
    ours = logging.getLogger("cachegen")
    if not ours.handlers:
        for handler in logging.getLogger("vllm").handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.getLogger("vllm").level or logging.INFO)
        ours.propagate = False


def _request_params(request: Any) -> dict[str, Any]:
    """The request's own cachegen knobs: ``kv_transfer_params={"cachegen": {...}}``."""
    params = (getattr(request, "kv_transfer_params", None) or {}).get("cachegen")
    return params if isinstance(params, dict) else {}


def _allowed_levels(held: list[dict[int, int]], allowed: Any) -> list[dict[int, int]]:
    """Keep only the levels a request allows (``"levels": [ids]``); the prefix ends at a chunk with none left."""
    if allowed is None:
        return held
    kept = []
    for levels in held:
        chunk = {level: size for level, size in levels.items() if level in set(allowed)}
        if not chunk:
            break
        kept.append(chunk)
    return kept


def _chunk_codec(layout: KVLayout, model_id: bytes, settings: CodecSettings, home: str) -> ChunkCodec:
    levels = tuple(LEVEL_BY_NAME[name].id for name in settings.save_levels)
    path = Path(settings.tables_path) if settings.tables_path else default_tables_path(Path(home), model_id)
    tables = load_tables(path.read_bytes()) if path.is_file() else None
    if tables is None and any(level != 0 for level in levels):
        raise CacheGenError(
            f"save levels {settings.save_levels} need calibrated tables at {path}: run cachegen calibrate"
        )
    return ChunkCodec(layout, model_id, levels, tables)


def _streamer(store: Any, chunk_codec: ChunkCodec, settings: StreamSettings) -> Streamer:
    shaper = None
    if settings.shape_trace:
        is_file = Path(settings.shape_trace).is_file()
        trace = (
            parse_trace(Path(settings.shape_trace).read_text())
            if is_file
            else [TracePoint(0, parse_rate(settings.shape_trace))]
        )
        shaper = LinkShaper(trace)
    speeds = NodeSpeeds(settings.prior_decode_bytes_per_s, settings.prior_prefill_tokens_per_s)
    return Streamer(store, chunk_codec, speeds, settings.prior_bandwidth_bps, shaper)


class CacheGenConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        _log_through_vllm()
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        store_settings = StoreSettings(**extra.get("store", {}))
        codec_settings = CodecSettings(**extra.get("codec", {}))
        stream_settings = StreamSettings(**extra.get("stream", {}))
        if not store_settings.url:
            raise CacheGenError("kv_connector_extra_config.store.url is required (e.g. disk:///var/cache/kv)")
        layout = _layout_of(vllm_config, codec_settings.tokens_per_chunk)
        model_id = model_fingerprint(Path(vllm_config.model_config.model), layout)
        self._codec = _chunk_codec(layout, model_id, codec_settings, extra.get("home", "."))
        self._stream_settings = stream_settings
        self._block_size = vllm_config.cache_config.block_size
        self._blocks_per_chunk = layout.tokens_per_chunk // self._block_size
        self._store = open_store(store_settings.url, store_settings.capacity_bytes)
        self._requests: dict[str, RequestState] = {}
        self._pending_loads: dict[str, tuple[int, list]] = {}  # request -> (local tokens, levels held per chunk)
        self._queued_loads: list[TransferJob] = []
        self._step_started: float | None = None
        self._worker = None
        if role == KVConnectorRole.WORKER:
            streamer = _streamer(self._store, self._codec, stream_settings)
            self._worker = ConnectorWorker(self._store, self._codec, streamer, self._block_size)
        log.info(
            "cachegen connector role=%s store=%s model_id=%s chunk_tokens=%d save_levels=%s async_load=%s",
            role.name,
            store_settings.url.split("?")[0],
            model_id.hex(),
            layout.tokens_per_chunk,
            codec_settings.save_levels,
            stream_settings.is_async_load,
        )

    # ---- scheduler side ---------------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens beyond ``num_computed_tokens`` (the engine's own prefix-cache hit) that the store can supply.

        Called by the scheduler, possibly several times per request, before blocks are allocated. Never raises:
        a store that is down counts as a miss, and the engine recomputes.
        """
        prompt = list(request.prompt_token_ids or [])
        keys = chunk_keys(prompt, self._codec.layout, self._codec.model_id, request.cache_salt or "")
        params = _request_params(request)
        state = RequestState(keys=keys, is_save_enabled=bool(params.get("save", True)))
        self._requests[request.request_id] = state
        if not params.get("load", True):
            return 0, False
        try:
            hits = self._store.lookup(keys[: num_loadable_chunks(len(prompt), self._codec.layout.tokens_per_chunk)])
        except CacheGenError as exc:
            log.warning("store lookup failed, recomputing request=%s error=%s", request.request_id, exc)
            return 0, False
        state.num_stored_chunks = len(hits)
        held = _allowed_levels([info.levels for info in hits], params.get("levels"))
        num_new = len(held) * self._codec.layout.tokens_per_chunk - num_computed_tokens
        if num_new <= 0:
            return 0, False
        self._pending_loads[request.request_id] = (num_computed_tokens, held)
        return num_new, self._stream_settings.is_async_load

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        """Called by the scheduler after allocating blocks; remembers them and queues the load if any."""
        state = self._requests.get(request.request_id)
        if state is None:
            return
        state.block_ids = list(blocks.get_block_ids()[0])
        pending = self._pending_loads.pop(request.request_id, None)
        if num_external_tokens <= 0 or pending is None:
            return
        num_local, hits = pending
        tokens_per_chunk = self._codec.layout.tokens_per_chunk
        spans = load_spans(state, hits, num_local, tokens_per_chunk, self._blocks_per_chunk)
        params, defaults = _request_params(request), self._stream_settings
        slo_s = float(params["slo_ms"]) / 1e3 if "slo_ms" in params else defaults.slo_s
        suffix = len(request.prompt_token_ids or []) - len(hits) * tokens_per_chunk
        job = TransferJob(
            request.request_id, spans, slo_s, int(params.get("min_quality", defaults.min_quality)), suffix
        )
        self._queued_loads.append(job)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """Called once per engine step: the loads queued since the last step plus the chunks completed by it."""
        meta = CacheGenMetadata(
            loads=self._queued_loads, num_scheduled_tokens=scheduler_output.total_num_scheduled_tokens
        )
        self._queued_loads = []
        for new in scheduler_output.scheduled_new_reqs:
            self._queue_saves(meta, new.req_id, new.num_computed_tokens, scheduler_output, list(new.block_ids[0]))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_blocks = cached.new_block_ids[i]
            state = self._requests.get(req_id)
            if state is not None and new_blocks is not None:
                resumed = req_id in cached.resumed_req_ids  # a resumed request lists all its blocks again
                state.block_ids = list(new_blocks[0]) if resumed else state.block_ids + list(new_blocks[0])
            self._queue_saves(meta, req_id, cached.num_computed_tokens[i], scheduler_output, None)
        return meta

    def _queue_saves(
        self, meta: CacheGenMetadata, req_id: str, num_computed: int, output: Any, block_ids: list[int] | None
    ) -> None:
        state = self._requests.get(req_id)
        if state is None:
            return
        if block_ids is not None:
            state.block_ids = block_ids
        num_prompt = len(state.keys) * self._codec.layout.tokens_per_chunk
        num_after = num_computed + output.num_scheduled_tokens.get(req_id, 0)
        spans = save_spans(state, num_after, num_prompt, self._codec.layout.tokens_per_chunk, self._blocks_per_chunk)
        if spans:
            meta.saves.append(TransferJob(req_id, spans))

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Forget the request. Saves copy their KV out at the end of the step, so blocks can be freed now."""
        self._requests.pop(request.request_id, None)
        self._pending_loads.pop(request.request_id, None)
        return False, None

    # ---- worker side ------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        """Called once by the model runner with every layer's paged cache: learns the cache geometry."""
        forward_context = self._vllm_config.compilation_config.static_forward_context
        self._worker.attach(kv_caches, forward_context)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """Called by the model runner before each step's forward; the step's duration prices recompute."""
        super().bind_connector_metadata(connector_metadata)
        self._step_started = time.perf_counter()

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        """Called by the model runner each step: loads this step's chunks (in the background when async)."""
        meta = self._get_connector_metadata()
        for job in meta.loads:
            self._worker.load(job, is_async=self._stream_settings.is_async_load)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete before the step's forward (sync) or before the request is scheduled (async)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return  # all layers of a chunk are copied out at once in wait_for_save

    def wait_for_save(self) -> None:
        """Called after the step's forward: copies completed chunks out; encoding and writing go on in background."""
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if self._step_started is not None and not meta.loads:
            self._worker.observe_step(meta.num_scheduled_tokens, time.perf_counter() - self._step_started)
        for job in meta.saves:
            self._worker.save(job)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, self._worker.take_finished_loads() or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_failed_blocks()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
        self._store.close()
