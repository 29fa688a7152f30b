"""The Fetch stream: read the client's plan and level changes while sending chunks in order.

A reader task appends keys and applies level changes to a ``FetchPlan``; the sender takes chunk ``i`` only after
chunk ``i - 1`` is fully sent, so a change that arrives before then always applies (see kvstore.proto, Fetch).
To overlap backend reads with sending, chunk ``i + 1`` is read ahead at its planned level while chunk ``i`` is
sent; if its level changes in the meantime the read-ahead is dropped and the chunk read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from cachegen import obs
from cachegen.errors import ChunkNotFound, FormatError, InvalidRequest
from cachegen.spec import ChunkKey
from cachegen.store.backends import KVStore
from cachegen.store.wire import MAX_KEYS, fetch_pieces, key_from_wire, pb, with_level

log = logging.getLogger(__name__)


class FetchPlan:
    """Chunks asked for so far, their current level choice (None = skip), and whether the client is done."""

    def __init__(self) -> None:
        self.keys: list[ChunkKey] = []
        self.levels: list[int | None] = []
        self.is_closed = False
        self.error: BaseException | None = None
        self.next_index = 0  # first chunk not yet started: changes below it are ignored
        self._changed = asyncio.Event()

    def add(self, request: pb.FetchRequest) -> None:
        if len(self.keys) + len(request.keys) > MAX_KEYS:
            raise InvalidRequest(f"more than {MAX_KEYS} chunks in one Fetch stream")
        for key_bytes in request.keys:
            key = key_from_wire(key_bytes)
            self.keys.append(key)
            self.levels.append(key.level)
        for change in request.changes:
            if change.index >= len(self.keys):
                raise InvalidRequest(f"level change for chunk {change.index}; only {len(self.keys)} asked for")
            if change.index >= self.next_index:
                self.levels[change.index] = None if change.skip else change.level
        self._changed.set()

    def close(self, error: BaseException | None = None) -> None:
        self.is_closed, self.error = True, error
        self._changed.set()

    def peek(self, index: int) -> tuple[ChunkKey, int | None] | None:
        """Chunk ``index`` and its level as planned now, if asked for yet; does not start it."""
        return (self.keys[index], self.levels[index]) if index < len(self.keys) else None

    async def take(self, index: int) -> tuple[ChunkKey, int | None] | None:
        """Chunk ``index`` and its level, waiting for the client to ask; None once the client is done."""
        while index >= len(self.keys):
            if self.error is not None:
                raise self.error
            if self.is_closed:
                return None
            self._changed.clear()
            await self._changed.wait()
        self.next_index = index + 1
        return self.keys[index], self.levels[index]


async def _read_requests(requests: AsyncIterator[pb.FetchRequest], plan: FetchPlan) -> None:
    try:
        async for request in requests:
            plan.add(request)
    except Exception as exc:  # noqa: BLE001 - handed to the sender, which ends the call with its status
        plan.close(exc)
    else:
        plan.close()


def _status_message(index: int, level: int, status: int) -> pb.FetchResponse:
    return pb.FetchResponse(index=index, level=level, status=status)


@dataclass(frozen=True, slots=True)
class _Read:
    """A backend read of one chunk at one level, running in a worker thread."""

    index: int
    level: int | None
    task: asyncio.Task[bytes | ChunkNotFound | FormatError] | None


async def _get(store: KVStore, key: ChunkKey) -> bytes | ChunkNotFound | FormatError:
    try:
        return await asyncio.to_thread(store.get, key)
    except (ChunkNotFound, FormatError) as exc:  # per-chunk outcomes, reported in-band
        return exc


def _start_read(store: KVStore, index: int, key: ChunkKey, level: int | None) -> _Read:
    task = None if level is None else asyncio.create_task(_get(store, with_level(key, level)))
    return _Read(index, level, task)


def _drop(read: _Read | None) -> None:
    """Abandon a read-ahead; a failure it already had is consumed so that asyncio does not log it."""
    if read is None or read.task is None:
        return
    if read.task.done() and not read.task.cancelled():
        read.task.exception()
    read.task.cancel()


async def _messages(read: _Read, key: ChunkKey) -> AsyncIterator[pb.FetchResponse]:
    """The responses for one chunk once its read is done."""
    if read.task is None:
        obs.STORE_FETCH_CHUNKS.labels("skipped").inc()
        yield _status_message(read.index, key.level, pb.CHUNK_STATUS_SKIPPED)
        return
    result = await read.task
    level = read.level if read.level is not None else key.level
    if isinstance(result, ChunkNotFound):
        obs.STORE_FETCH_CHUNKS.labels("not_found").inc()
        yield _status_message(read.index, level, pb.CHUNK_STATUS_NOT_FOUND)
    elif isinstance(result, FormatError):
        log.warning("corrupt chunk in fetch index=%d level=%d error=%s", read.index, level, result)
        obs.STORE_FETCH_CHUNKS.labels("corrupt").inc()
        yield _status_message(read.index, level, pb.CHUNK_STATUS_CORRUPT)
    else:
        obs.STORE_FETCH_CHUNKS.labels("ok").inc()
        obs.STORE_BYTES.labels("out").inc(len(result))
        for message in fetch_pieces(read.index, level, result):
            yield message


async def serve_fetch(store: KVStore, requests: AsyncIterator[pb.FetchRequest]) -> AsyncIterator[pb.FetchResponse]:
    """Responses of one Fetch call; raises the reader's error (e.g. InvalidRequest) to end the call."""
    plan = FetchPlan()
    reader = asyncio.create_task(_read_requests(requests, plan))
    ahead: _Read | None = None
    try:
        index = 0
        while (item := await plan.take(index)) is not None:
            key, level = item
            current = ahead if ahead is not None and ahead.level == level else _start_read(store, index, key, level)
            if current is not ahead:
                _drop(ahead)
            upcoming = plan.peek(index + 1)
            ahead = _start_read(store, index + 1, *upcoming) if upcoming is not None else None
            async for message in _messages(current, key):
                yield message
            index += 1
    finally:
        _drop(ahead)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
