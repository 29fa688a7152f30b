"""asyncio gRPC client of the store service: the same calls, deadlines, retries and typed errors as ``StoreClient``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Self

import grpc

from cachegen.errors import StoreUnavailable
from cachegen.spec import ChunkKey
from cachegen.store.backends import ChunkInfo, StoreStats
from cachegen.store.client import ClientOptions
from cachegen.store.wire import (
    FetchAssembler,
    FetchedChunk,
    channel_options,
    error_from_rpc,
    lookup_from_wire,
    payload_of,
    pb,
    pb_grpc,
    put_pieces,
    stats_from_wire,
)


@contextlib.asynccontextmanager
async def _rpc_errors(address: str) -> AsyncIterator[None]:
    try:
        yield
    except grpc.RpcError as exc:
        raise error_from_rpc(exc, address) from None


class AsyncFetchStream:
    """A running Fetch: ``async for`` the chunks in order; ``change_level``/``skip`` re-plan later chunks."""

    def __init__(self, call: grpc.aio.StreamStreamCall, options: ClientOptions, keys: Sequence[ChunkKey]) -> None:
        self._call = call
        self._address = options.address
        self._keys = [key.to_bytes() for key in keys]
        self._is_started = self._is_half_closed = False

    async def change_level(self, index: int, level: int) -> None:
        """Ask for chunk ``index`` at ``level`` instead; ignored by the server if it already started it."""
        await self._write(pb.FetchRequest(changes=[pb.LevelChange(index=index, level=level)]))

    async def skip(self, index: int) -> None:
        await self._write(pb.FetchRequest(changes=[pb.LevelChange(index=index, skip=True)]))

    async def _start(self) -> None:
        """Send the plan; it goes first, whether iteration or a level change comes first."""
        if not self._is_started:
            self._is_started = True
            await self._call.write(pb.FetchRequest(keys=self._keys))

    async def _write(self, request: pb.FetchRequest) -> None:
        async with _rpc_errors(self._address):
            await self._start()
            if not self._is_half_closed:
                await self._call.write(request)

    async def _half_close(self) -> None:
        if not self._is_half_closed:
            self._is_half_closed = True
            await self._call.done_writing()

    async def __aiter__(self) -> AsyncIterator[FetchedChunk]:
        assembler, num_done, num_chunks = FetchAssembler(), 0, len(self._keys)
        async with _rpc_errors(self._address):
            await self._start()
            if num_chunks == 0:
                await self._half_close()
            while (message := await self._call.read()) is not grpc.aio.EOF:
                chunk = assembler.feed(message)
                if chunk is None:
                    continue
                num_done += 1
                if num_done == num_chunks:
                    await self._half_close()
                yield chunk
        if num_done < num_chunks:
            raise StoreUnavailable(f"store {self._address} ended Fetch after {num_done} of {num_chunks} chunks")

    def close(self) -> None:
        self._call.cancel()


class AsyncStoreClient:
    """The store service for asyncio code. Create and use it inside one event loop."""

    def __init__(self, options: ClientOptions) -> None:
        self.options = options
        self._channel = grpc.aio.insecure_channel(options.address, options=channel_options())
        self._stub = pb_grpc.KVStoreStub(self._channel)

    @classmethod
    def from_url(cls, url: str) -> AsyncStoreClient:
        return cls(ClientOptions.from_url(url))

    async def put(self, key: ChunkKey, data: bytes) -> None:
        await self.put_levels({key: data})

    async def put_levels(self, payloads: Mapping[ChunkKey, bytes]) -> dict[int, int]:
        """Upload several levels of one chunk in one call; returns level -> size of the levels stored."""
        num_bytes = sum(len(data) for data in payloads.values())
        pieces = (piece for key, data in payloads.items() for piece in put_pieces(key, data))
        async with _rpc_errors(self.options.address):
            response = await self._stub.Put(
                pieces, timeout=self.options.deadline_s(num_bytes), metadata=self.options.metadata()
            )
        return {stored.level: stored.size_bytes for stored in response.stored}

    async def get(self, key: ChunkKey) -> bytes:
        chunks = [chunk async for chunk in self.fetch([key])]
        return payload_of(chunks[0], key)

    def fetch(self, keys: Sequence[ChunkKey], timeout_s: float | None = None) -> AsyncFetchStream:
        """Start streaming ``keys`` (each at its own level) in order; see ``AsyncFetchStream``."""
        deadline_s = timeout_s if timeout_s is not None else self.options.deadline_s(len(keys) * (8 << 20))
        call = self._stub.Fetch(timeout=deadline_s, metadata=self.options.metadata())
        return AsyncFetchStream(call, self.options, keys)

    async def lookup(self, keys: Sequence[ChunkKey]) -> list[ChunkInfo]:
        request = pb.LookupRequest(keys=[key.to_bytes() for key in keys])
        async with _rpc_errors(self.options.address):
            response = await self._stub.Lookup(
                request, timeout=self.options.timeout_s, metadata=self.options.metadata()
            )
        return lookup_from_wire(response)

    async def delete(self, key: ChunkKey) -> int:
        request = pb.DeleteRequest(key=key.to_bytes())
        async with _rpc_errors(self.options.address):
            response = await self._stub.Delete(
                request, timeout=self.options.timeout_s, metadata=self.options.metadata()
            )
        return response.num_removed

    async def stats(self) -> StoreStats:
        async with _rpc_errors(self.options.address):
            response = await self._stub.Stats(
                pb.StatsRequest(), timeout=self.options.timeout_s, metadata=self.options.metadata()
            )
        return stats_from_wire(response)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
