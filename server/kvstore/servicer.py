"""The KVStore gRPC servicer (asyncio) over a ``TenantStore`` backend.

Every call resolves its tenant from the bearer token and works on that tenant's namespace of the backend.
Backend calls are synchronous file or Redis I/O, so they run in worker threads. Errors become statuses through
``cachegen.errors.STATUS_TABLE``; unknown exceptions become INTERNAL with a generic message and a logged trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import grpc

from cachegen import obs
from cachegen.errors import CacheGenError, InvalidRequest, Unauthenticated
from cachegen.spec import ChunkKey
from cachegen.store.backends import KVStore, TenantStore, chunk_id
from cachegen.store.wire import (
    ERROR_CLASS_KEY,
    MAX_KEYS,
    Assembler,
    key_from_wire,
    lookup_to_wire,
    pb,
    pb_grpc,
    stats_to_wire,
    status_of,
)
from server.kvstore.auth import TokenTable
from server.kvstore.fetch import serve_fetch

log = logging.getLogger(__name__)


class KVStoreServicer(pb_grpc.KVStoreServicer):
    """Serves Put, Lookup, Fetch, Delete and Stats; see proto/cachegen/kvstore/v1/kvstore.proto."""

    def __init__(self, backend: TenantStore, tokens: TokenTable) -> None:
        self._backend = backend
        self._tokens = tokens
        self._views: dict[str, KVStore] = {}

    def _store_for(self, context: grpc.aio.ServicerContext) -> KVStore:
        tenant = self._tokens.tenant_for(context.invocation_metadata())
        if tenant is None:  # the interceptor already refused such calls; checked again here on purpose
            raise Unauthenticated("missing or unknown bearer token")
        if tenant not in self._views:
            self._views[tenant] = self._backend.namespaced(tenant)
        return self._views[tenant]

    @contextlib.asynccontextmanager
    async def _call(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[KVStore]:
        """Times the call, counts its status and turns exceptions into gRPC statuses."""
        start, status = time.perf_counter(), "OK"
        try:
            yield self._store_for(context)
        except CacheGenError as exc:
            code = status_of(exc)
            status = code.name
            log.info("call failed method=%s status=%s error=%s", method, status, exc)
            context.set_trailing_metadata(((ERROR_CLASS_KEY, type(exc).__name__),))
            await context.abort(code, str(exc))
        except (asyncio.CancelledError, GeneratorExit):
            status = "CANCELLED"
            raise
        except Exception:
            status = "INTERNAL"
            log.exception("call failed method=%s status=INTERNAL", method)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error (see the store's log)")
        finally:
            obs.STORE_REQUESTS.labels(method, status).inc()
            obs.STORE_REQUEST_SECONDS.labels(method).observe(time.perf_counter() - start)

    async def Put(self, request_iterator: AsyncIterator[pb.Piece], context: grpc.aio.ServicerContext) -> pb.PutResponse:
        async with self._call("Put", context) as store:
            stored = await _receive_levels(store, request_iterator)
            return pb.PutResponse(stored=stored)

    async def Lookup(self, request: pb.LookupRequest, context: grpc.aio.ServicerContext) -> pb.LookupResponse:
        async with self._call("Lookup", context) as store:
            if len(request.keys) > MAX_KEYS:
                raise InvalidRequest(f"Lookup of {len(request.keys)} keys; at most {MAX_KEYS}")
            keys = [key_from_wire(k) for k in request.keys]
            infos = await asyncio.to_thread(store.lookup, keys)
            obs.STORE_LOOKUP_CHUNKS.labels("hit").inc(len(infos))
            obs.STORE_LOOKUP_CHUNKS.labels("miss").inc(len(keys) - len(infos))
            return lookup_to_wire(infos)

    async def Fetch(self, request_iterator: AsyncIterator[pb.FetchRequest], context: grpc.aio.ServicerContext) -> None:
        # Writes go through context.write (not a generator): a write fails only when the call has ended (deadline
        # passed, client gone), and this handler then ends as cancelled instead of logging a servicer error.
        async with self._call("Fetch", context) as store:
            async for message in serve_fetch(store, request_iterator):
                try:
                    await context.write(message)
                except Exception as exc:  # noqa: BLE001 - grpc raises a private error type here
                    remaining_s = context.time_remaining()
                    log.info("fetch ended by the peer or its deadline remaining_s=%s error=%s", remaining_s, exc)
                    raise asyncio.CancelledError from None

    async def Delete(self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext) -> pb.DeleteResponse:
        async with self._call("Delete", context) as store:
            removed = await asyncio.to_thread(store.delete, key_from_wire(request.key))
            return pb.DeleteResponse(num_removed=removed)

    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.StatsResponse:
        async with self._call("Stats", context) as store:
            return stats_to_wire(await asyncio.to_thread(store.stats))


async def _receive_levels(store: KVStore, pieces: AsyncIterator[pb.Piece]) -> list[pb.LevelSize]:
    """Commit each level of one chunk as soon as its last piece arrives with a matching CRC."""
    stored: list[pb.LevelSize] = []
    group: tuple[bytes, bytes, bytes] | None = None
    current: tuple[ChunkKey, Assembler] | None = None
    async for piece in pieces:
        key = key_from_wire(piece.key)
        group = group or chunk_id(key)
        if chunk_id(key) != group:
            raise InvalidRequest(f"Put stream mixes chunks {group[2].hex()} and {key.group}")
        if current is None:
            current = (key, Assembler(piece.total_bytes))
        elif current[0] != key:
            raise InvalidRequest(f"level {key.level} started before level {current[0].level} was complete")
        payload = current[1].add(piece.offset, piece.total_bytes, piece.data, piece.crc32)
        if payload is not None:
            await asyncio.to_thread(store.put, key, payload)
            obs.STORE_BYTES.labels("in").inc(len(payload))
            stored.append(pb.LevelSize(level=key.level, size_bytes=len(payload)))
            current = None
    if current is not None:
        raise InvalidRequest(f"Put stream ended inside level {current[0].level} of chunk {current[0].group}")
    return stored
