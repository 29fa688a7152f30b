"""Synchronous gRPC client of the store service; implements ``KVStore`` so remote and local stores are one interface.

Every call has a deadline (``timeout_s``, plus transfer time at ``MIN_BANDWIDTH_BPS`` for payload calls); UNAVAILABLE
is retried by gRPC's own retry policy with exponential backoff (see ``wire.service_config``). Failures surface as
typed errors of ``cachegen.errors``: a down or unreachable store is ``StoreUnavailable`` within a fraction of a
second, so callers recompute instead.
"""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Self
from urllib.parse import parse_qs, urlsplit

import grpc

from cachegen.errors import DeadlineExceeded, InvalidRequest, StoreUnavailable
from cachegen.spec import ChunkKey
from cachegen.store.backends import ChunkInfo, StoreStats
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

MIN_BANDWIDTH_BPS = 10e6  # bytes/s assumed when sizing a payload call's deadline


@dataclass(frozen=True, slots=True)
class ClientOptions:
    address: str  # host:port
    token: str | None = None
    timeout_s: float = 5.0

    @classmethod
    def from_url(cls, url: str) -> ClientOptions:
        """``grpc://host:port[?token=T&timeout_s=S]``."""
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        if parts.scheme != "grpc" or not parts.netloc:
            raise InvalidRequest(f"store client URL must be grpc://host:port, got {url!r}")
        try:
            timeout_s = float(query.get("timeout_s", ["5"])[-1])
        except ValueError:
            raise InvalidRequest(f"timeout_s must be a number in {url!r}") from None
        return cls(parts.netloc, query.get("token", [None])[-1], timeout_s)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def deadline_s(self, num_bytes: int = 0) -> float:
        return self.timeout_s + num_bytes / MIN_BANDWIDTH_BPS


@contextlib.contextmanager
def rpc_errors(address: str) -> Iterator[None]:
    """Re-raise gRPC failures as the typed cachegen errors behind them."""
    try:
        yield
    except grpc.RpcError as exc:
        raise error_from_rpc(exc, address) from None


class FetchStream:
    """A running Fetch: iterate for chunks in order; ``change_level``/``skip`` re-plan chunks not yet started."""

    def __init__(self, stub: pb_grpc.KVStoreStub, options: ClientOptions, keys: Sequence[ChunkKey], timeout_s: float):
        self._address = options.address
        self._num_chunks = len(keys)
        self._requests: queue.SimpleQueue[pb.FetchRequest | None] = queue.SimpleQueue()
        self._requests.put(pb.FetchRequest(keys=[key.to_bytes() for key in keys]))
        self._call = stub.Fetch(self._request_iter(), timeout=timeout_s, metadata=options.metadata())

    def _request_iter(self) -> Iterator[pb.FetchRequest]:
        while (request := self._requests.get()) is not None:
            yield request

    def change_level(self, index: int, level: int) -> None:
        """Ask for chunk ``index`` at ``level`` instead; ignored by the server if it already started it."""
        self._requests.put(pb.FetchRequest(changes=[pb.LevelChange(index=index, level=level)]))

    def skip(self, index: int) -> None:
        """Do not send chunk ``index`` (the caller will recompute it)."""
        self._requests.put(pb.FetchRequest(changes=[pb.LevelChange(index=index, skip=True)]))

    def __iter__(self) -> Iterator[FetchedChunk]:
        assembler, num_done = FetchAssembler(), 0
        if self._num_chunks == 0:
            self.close()
        with rpc_errors(self._address):
            for message in self._call:
                chunk = assembler.feed(message)
                if chunk is None:
                    continue
                num_done += 1
                if num_done == self._num_chunks:
                    self._requests.put(None)  # half-close: the server ends the stream after the last chunk
                yield chunk
        if num_done < self._num_chunks:
            raise StoreUnavailable(f"store {self._address} ended Fetch after {num_done} of {self._num_chunks} chunks")

    def close(self) -> None:
        """Stop the stream (safe to call at any time, also after it finished)."""
        self._requests.put(None)
        self._call.cancel()


class StoreClient:
    """The store service as a ``KVStore``. Thread-safe; one channel per client, reused by all calls."""

    def __init__(self, options: ClientOptions) -> None:
        self.options = options
        self._channel = grpc.insecure_channel(options.address, options=channel_options())
        self._stub = pb_grpc.KVStoreStub(self._channel)

    @classmethod
    def from_url(cls, url: str) -> StoreClient:
        return cls(ClientOptions.from_url(url))

    def put(self, key: ChunkKey, data: bytes) -> None:
        self.put_levels({key: data})

    def put_levels(self, payloads: Mapping[ChunkKey, bytes]) -> dict[int, int]:
        """Upload several levels of one chunk in one call; returns level -> size of the levels stored."""
        num_bytes = sum(len(data) for data in payloads.values())
        pieces = (piece for key, data in payloads.items() for piece in put_pieces(key, data))
        with rpc_errors(self.options.address):
            response = self._stub.Put(
                pieces, timeout=self.options.deadline_s(num_bytes), metadata=self.options.metadata()
            )
        return {stored.level: stored.size_bytes for stored in response.stored}

    def get(self, key: ChunkKey) -> bytes:
        chunks = list(self.fetch([key]))
        return payload_of(chunks[0], key)

    def fetch(self, keys: Sequence[ChunkKey], timeout_s: float | None = None) -> FetchStream:
        """Stream ``keys`` (each at its own level) in order; see ``FetchStream``. May block in iteration only."""
        deadline_s = timeout_s if timeout_s is not None else self.options.deadline_s(len(keys) * (8 << 20))
        return FetchStream(self._stub, self.options, keys, deadline_s)

    def lookup(self, keys: Sequence[ChunkKey]) -> list[ChunkInfo]:
        request = pb.LookupRequest(keys=[key.to_bytes() for key in keys])
        with rpc_errors(self.options.address):
            response = self._stub.Lookup(request, timeout=self.options.timeout_s, metadata=self.options.metadata())
        return lookup_from_wire(response)

    def delete(self, key: ChunkKey) -> int:
        request = pb.DeleteRequest(key=key.to_bytes())
        with rpc_errors(self.options.address):
            response = self._stub.Delete(request, timeout=self.options.timeout_s, metadata=self.options.metadata())
        return response.num_removed

    def stats(self) -> StoreStats:
        with rpc_errors(self.options.address):
            response = self._stub.Stats(
                pb.StatsRequest(), timeout=self.options.timeout_s, metadata=self.options.metadata()
            )
        return stats_from_wire(response)

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the channel connects; DeadlineExceeded otherwise. For start-up scripts and tests."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise DeadlineExceeded(f"store {self.options.address} not ready after {timeout_s} s") from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
