"""Cached contexts (Gemini ``cachedContents`` style): register, look up, extend, expire and delete.

Registering prefills the context once with saving on (a 1-token generation) and waits until every full chunk is
in the KV store, so any node sharing the store can reuse it. A context of one tenant is invisible to another:
its records are filtered by tenant, and its chunk keys are salted with the tenant (DESIGN.md §10).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from cachegen import obs
from cachegen.config import ServerSettings
from cachegen.errors import CacheGenError, DeadlineExceeded
from cachegen.spec import ChunkKey, chunk_keys
from cachegen.store import KVStore
from server.api.engine_host import Engine, GenerationRequest, SamplingOptions
from server.api.errors import ApiError
from server.api.registry import ContextRecord, ContextRegistry, new_context_id
from server.api.schemas import ContextCreate, ContextUpdate

log = logging.getLogger(__name__)

_POLL_S = 0.2
_MAX_STALL_S = 30.0  # no new chunk for this long after the prefill: saving failed (store down, refused)


@dataclass
class ContextService:
    """Owns the registry, the store handle the API uses for lookups and deletes, and background registrations."""

    registry: ContextRegistry
    store: KVStore
    engine: Engine
    settings: ServerSettings

    def __post_init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    # ---- create --------------------------------------------------------------------------------------------

    async def create(self, tenant: str, body: ContextCreate) -> ContextRecord:
        """Tokenize, record as PROCESSING, then register (awaited when ``body.wait``, else in the background)."""
        if body.text is not None:
            kind, messages, ids = "text", None, self.engine.encode(body.text)
        else:
            messages = [message.as_template_input() for message in body.messages or ()]
            kind, ids = "chat", self.engine.encode_chat(messages, add_generation_prompt=False)
        if len(ids) > self.max_context_tokens:
            raise ApiError(413, f"context has {len(ids)} tokens; the limit is {self.max_context_tokens}",
                           "context_too_large", "text" if kind == "text" else "messages")  # fmt: skip
        now = time.time()
        layout, _ = self.engine.chunk_space
        record = ContextRecord(
            id=new_context_id(), tenant=tenant, model=self.engine.model_name, kind=kind, token_ids=ids,
            create_time=now, update_time=now, expire_time=self._expiry(now, body.ttl, body.expire_time),
            display_name=body.display_name, messages=messages, num_chunks=len(ids) // layout.tokens_per_chunk,
        )  # fmt: skip
        self.registry.put(record)
        obs.API_CONTEXT_EVENTS.labels(event="created").inc()
        task = asyncio.create_task(self._register(record))
        self._tasks.add(task)
        task.add_done_callback(self._forget)
        if body.wait:
            record = await asyncio.shield(task)
        return record

    def _forget(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a failure is already logged and on the record

    @property
    def max_context_tokens(self) -> int:
        return self.settings.max_context_tokens or self.settings.max_model_len - 1

    def _expiry(self, now: float, ttl_s: float | None, expire_time: datetime | None) -> float:
        if expire_time is not None:
            aware = expire_time if expire_time.tzinfo else expire_time.replace(tzinfo=UTC)
            expire = aware.timestamp()
        else:
            expire = now + (self.settings.context_ttl_s if ttl_s is None else ttl_s)
        if expire <= now:
            raise ApiError(400, "the expiry must be in the future", "invalid_expiry", "ttl")
        if expire - now > self.settings.max_context_ttl_s:
            raise ApiError(400, f"the TTL may be at most {self.settings.max_context_ttl_s:.0f} s", "invalid_expiry",
                           "ttl")  # fmt: skip
        return expire

    async def _register(self, record: ContextRecord) -> ContextRecord:
        started = time.perf_counter()
        request = GenerationRequest(
            request_id=f"register-{record.id}", token_ids=record.token_ids, tenant=record.tenant,
            sampling=SamplingOptions(max_tokens=1, temperature=0.0), transfer={"load": True, "save": True},
        )  # fmt: skip
        try:
            async for _ in self.engine.generate(request):
                pass
            record = await self._wait_stored(record)
        except (CacheGenError, ApiError) as exc:
            record = replace(record, state="FAILED", error=str(exc), update_time=time.time())
            self._put_if_live(record)
            obs.API_CONTEXT_EVENTS.labels(event="failed").inc()
            log.warning("context registration failed id=%s error=%s", record.id, exc)
            raise
        obs.API_CONTEXT_REGISTER_SECONDS.observe(time.perf_counter() - started)
        log.info("context registered id=%s tokens=%d chunks=%d s=%.2f", record.id, len(record.token_ids),
                 record.num_chunks, time.perf_counter() - started)  # fmt: skip
        return record

    async def _wait_stored(self, record: ContextRecord) -> ContextRecord:
        """Saves finish on the engine's saver thread after the response: poll the store until all chunks are in."""
        keys = self.keys_of(record)
        deadline = time.monotonic() + self.settings.register_timeout_s
        stall_deadline = time.monotonic() + _MAX_STALL_S
        while True:
            num_stored = len(await asyncio.to_thread(self.store.lookup, keys)) if keys else 0
            done = num_stored >= len(keys)
            if num_stored != record.num_chunks_stored or done:
                stall_deadline = time.monotonic() + _MAX_STALL_S
                record = replace(record, num_chunks_stored=num_stored, state="ACTIVE" if done else record.state,
                                 update_time=time.time())  # fmt: skip
                if not self._put_if_live(record):
                    raise ApiError(404, f"context {record.id} was deleted while registering", "context_not_found")
            if done:
                return record
            if time.monotonic() > min(deadline, stall_deadline):
                raise DeadlineExceeded(f"only {num_stored} of {len(keys)} chunks reached the store in time")
            await asyncio.sleep(_POLL_S)

    def _put_if_live(self, record: ContextRecord) -> bool:
        """Write the record unless it was deleted meanwhile (DELETE during registration wins)."""
        if self.registry.get(record.id) is None:
            return False
        self.registry.put(record)
        return True

    def keys_of(self, record: ContextRecord) -> list[ChunkKey]:
        layout, model_id = self.engine.chunk_space
        return chunk_keys(record.token_ids, layout, model_id, record.tenant)[: record.num_chunks]

    # ---- read, update, delete, expire ----------------------------------------------------------------------

    def get(self, tenant: str, context_id: str) -> ContextRecord:
        """The tenant's live context; 404 for unknown, expired or another tenant's ids (indistinguishable)."""
        record = self.registry.get(context_id)
        if record is None or record.tenant != tenant or record.is_expired(time.time()):
            raise ApiError(404, f"no cached context {context_id!r}", "context_not_found", "cached_context")
        return record

    def list(self, tenant: str) -> list[ContextRecord]:
        now = time.time()
        records = [r for r in self.registry.all() if r.tenant == tenant and not r.is_expired(now)]
        return sorted(records, key=lambda r: r.create_time)

    def update(self, tenant: str, context_id: str, body: ContextUpdate) -> ContextRecord:
        record = self.get(tenant, context_id)
        now = time.time()
        record = replace(record, expire_time=self._expiry(now, body.ttl, body.expire_time), update_time=now)
        self.registry.put(record)
        return record

    async def delete(self, tenant: str, context_id: str) -> None:
        await self._remove(self.get(tenant, context_id), "deleted")

    async def _remove(self, record: ContextRecord, event: str) -> None:
        """Drop the record, then its chunks, except those another live context of the tenant still needs."""
        self.registry.delete(record.id)
        kept = {key.group for other in self.list(record.tenant) for key in self.keys_of(other)}
        doomed = [key for key in self.keys_of(record) if key.group not in kept]
        try:
            await asyncio.to_thread(lambda: [self.store.delete(key) for key in doomed])
        except CacheGenError as exc:  # the chunks age out of the store by its own TTL / capacity bound
            log.warning("context chunks not deleted id=%s error=%s", record.id, exc)
        obs.API_CONTEXT_EVENTS.labels(event=event).inc()
        log.info("context %s id=%s chunks_deleted=%d", event, record.id, len(doomed))

    async def expire(self) -> int:
        """Remove every expired context; returns how many. Called periodically by the app."""
        now = time.time()
        expired = [record for record in self.registry.all() if record.is_expired(now)]
        for record in expired:
            await self._remove(record, "expired")
        return len(expired)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
