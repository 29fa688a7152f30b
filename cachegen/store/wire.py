"""Everything about the store's gRPC wire: message <-> record translation, payload pieces, errors <-> statuses.

The only module that touches the generated ``_proto`` code; the client and the server both go through it.
Keys travel as ``ChunkKey.to_bytes()`` (see the .proto header).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from cachegen import errors
from cachegen.errors import CacheGenError, FormatError, InvalidRequest, Unauthenticated
from cachegen.spec import ChunkKey
from cachegen.store._proto import kvstore_pb2 as pb
from cachegen.store._proto import kvstore_pb2_grpc as pb_grpc
from cachegen.store.backends import ChunkInfo, StoreStats

__all__ = ["pb", "pb_grpc"]

SERVICE_NAME = "cachegen.kvstore.v1.KVStore"
PIECE_BYTES = 1 << 20  # 1 MiB messages: well under gRPC's 4 MiB default receive limit, which nobody raises
MAX_PIECE_BYTES = 2 << 20
MAX_PAYLOAD_BYTES = 1 << 30  # refuse a declared size beyond this before allocating anything
MAX_KEYS = 65536
ERROR_CLASS_KEY = "cachegen-error"  # trailing metadata: the class name of the error behind a status


_ERROR_CLASSES: dict[str, type[CacheGenError]] = {cls.__name__: cls for cls in errors.STATUS_TABLE}
_DEFAULT_BY_CODE: dict[grpc.StatusCode, type[CacheGenError]] = {
    grpc.StatusCode.NOT_FOUND: errors.ChunkNotFound,
    grpc.StatusCode.UNAVAILABLE: errors.StoreUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.DATA_LOSS: FormatError,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: Unauthenticated,
    grpc.StatusCode.FAILED_PRECONDITION: errors.LayoutMismatch,
    grpc.StatusCode.CANCELLED: errors.StoreUnavailable,
}


@dataclass(frozen=True, slots=True)
class FetchedChunk:
    """One chunk of a Fetch stream: ``data`` is None unless ``status`` is OK."""

    index: int
    level: int
    status: str  # "ok", "not_found", "corrupt" or "skipped"
    data: bytes | None


STATUS_NAMES = {
    pb.CHUNK_STATUS_OK: "ok",
    pb.CHUNK_STATUS_NOT_FOUND: "not_found",
    pb.CHUNK_STATUS_CORRUPT: "corrupt",
    pb.CHUNK_STATUS_SKIPPED: "skipped",
}


def key_from_wire(data: bytes) -> ChunkKey:
    try:
        return ChunkKey.from_bytes(data)
    except ValueError as exc:
        raise InvalidRequest(f"bad chunk key ({len(data)} bytes): {exc}") from None


def with_level(key: ChunkKey, level: int) -> ChunkKey:
    return ChunkKey(key.model_id, key.layout_digest, key.prefix_hash, key.chunk_index, level)


def put_pieces(key: ChunkKey, data: bytes, piece_bytes: int = PIECE_BYTES) -> Iterator[pb.Piece]:
    """The Put messages of one level: 1 MiB pieces, the CRC-32 of the payload on the last one."""
    key_bytes, total, crc = key.to_bytes(), len(data), zlib.crc32(data)
    view = memoryview(data)
    for offset in range(0, max(total, 1), piece_bytes):
        is_last = offset + piece_bytes >= total
        piece = bytes(view[offset : offset + piece_bytes])
        yield pb.Piece(key=key_bytes, offset=offset, total_bytes=total, data=piece, crc32=crc if is_last else 0)


def fetch_pieces(index: int, level: int, data: bytes, piece_bytes: int = PIECE_BYTES) -> Iterator[pb.FetchResponse]:
    """The Fetch messages of one chunk's payload."""
    total, crc = len(data), zlib.crc32(data)
    view = memoryview(data)
    for offset in range(0, max(total, 1), piece_bytes):
        is_last = offset + piece_bytes >= total
        yield pb.FetchResponse(
            index=index, level=level, status=pb.CHUNK_STATUS_OK, offset=offset, total_bytes=total,
            data=bytes(view[offset : offset + piece_bytes]), crc32=crc if is_last else 0,
        )  # fmt: skip


class Assembler:
    """Joins the pieces of one payload, checking order, the declared size and the final CRC-32.

    Hostile input gives InvalidRequest (bad order or sizes) or FormatError (CRC) before any large allocation.
    """

    def __init__(self, total_bytes: int) -> None:
        if total_bytes > MAX_PAYLOAD_BYTES:
            raise InvalidRequest(f"payload of {total_bytes} bytes exceeds the limit of {MAX_PAYLOAD_BYTES}")
        self.total_bytes = total_bytes
        self._parts: list[bytes] = []
        self._received = 0

    def add(self, offset: int, total_bytes: int, data: bytes, crc32: int) -> bytes | None:
        """Add one piece; returns the whole payload after its last piece, else None."""
        if offset != self._received or total_bytes != self.total_bytes:
            raise InvalidRequest(f"piece at offset {offset} of {total_bytes} bytes; expected {self._received}")
        if len(data) > MAX_PIECE_BYTES or self._received + len(data) > total_bytes:
            raise InvalidRequest(f"piece of {len(data)} bytes at {offset} overruns the payload of {total_bytes}")
        self._parts.append(data)
        self._received += len(data)
        if self._received < total_bytes:
            return None
        payload = b"".join(self._parts)
        if zlib.crc32(payload) != crc32:
            raise FormatError("payload crc32", offset, zlib.crc32(payload), f"expected {crc32}")
        return payload


def lookup_to_wire(infos: list[ChunkInfo]) -> pb.LookupResponse:
    chunks = [
        pb.ChunkLevels(levels=[pb.LevelSize(level=lv, size_bytes=size) for lv, size in sorted(info.levels.items())])
        for info in infos
    ]
    return pb.LookupResponse(chunks=chunks)


def lookup_from_wire(response: pb.LookupResponse) -> list[ChunkInfo]:
    return [ChunkInfo({ls.level: ls.size_bytes for ls in chunk.levels}) for chunk in response.chunks]


def stats_to_wire(stats: StoreStats) -> pb.StatsResponse:
    return pb.StatsResponse(
        backend=stats.backend, num_chunks=stats.num_chunks, num_payloads=stats.num_payloads,
        size_bytes=stats.size_bytes, capacity_bytes=stats.capacity_bytes, hits=stats.hits, misses=stats.misses,
        evictions=stats.evictions,
    )  # fmt: skip


def stats_from_wire(response: pb.StatsResponse) -> StoreStats:
    return StoreStats(
        response.backend, response.num_chunks, response.num_payloads, response.size_bytes,
        response.capacity_bytes, response.hits, response.misses, response.evictions,
    )  # fmt: skip


def status_of(error: BaseException) -> grpc.StatusCode:
    """The gRPC status of an error, from the one table in cachegen.errors."""
    return grpc.StatusCode[errors.status_for(error)[0]]


def error_from_rpc(error: grpc.RpcError, address: str) -> CacheGenError:
    """The typed cachegen error behind a failed call (named by trailing metadata, else by status code)."""
    code: grpc.StatusCode = error.code()
    details = f"store {address}: {code.name}: {error.details()}"
    trailing = dict(error.trailing_metadata() or ())
    cls = _ERROR_CLASSES.get(str(trailing.get(ERROR_CLASS_KEY, ""))) or _DEFAULT_BY_CODE.get(code)
    if cls is None:
        return errors.StoreUnavailable(details)
    if issubclass(cls, FormatError):
        return cls("remote payload", 0, None, details)
    return cls(details)


def service_config(max_attempts: int = 3) -> str:
    """gRPC's own retry policy: UNAVAILABLE is retried with exponential backoff (calls are idempotent)."""
    policy = {
        "maxAttempts": max_attempts,
        "initialBackoff": "0.05s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    return json.dumps({"methodConfig": [{"name": [{"service": SERVICE_NAME}], "retryPolicy": policy}]})


def channel_options() -> list[tuple[str, object]]:
    """Client channel options: retries, quick reconnects after a store restart, keepalive for dead peers."""
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config()),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


class FetchAssembler:
    """Client side of Fetch: turns the response messages into whole ``FetchedChunk``s."""

    def __init__(self) -> None:
        self._current: tuple[int, int, Assembler] | None = None

    def feed(self, message: pb.FetchResponse) -> FetchedChunk | None:
        """The chunk that ``message`` completes, else None. A payload failing its CRC comes back as corrupt."""
        if message.status != pb.CHUNK_STATUS_OK:
            self._current = None
            return FetchedChunk(message.index, message.level, STATUS_NAMES.get(message.status, "corrupt"), None)
        if self._current is None or message.offset == 0:
            self._current = (message.index, message.level, Assembler(message.total_bytes))
        index, level, assembler = self._current
        if message.index != index:
            raise FormatError("fetch piece index", message.offset, message.index, f"inside chunk {index}")
        try:
            data = assembler.add(message.offset, message.total_bytes, message.data, message.crc32)
        except FormatError:
            self._current = None
            return FetchedChunk(index, level, "corrupt", None)
        if data is None:
            return None
        self._current = None
        return FetchedChunk(index, level, "ok", data)


def payload_of(chunk: FetchedChunk, key: ChunkKey) -> bytes:
    """The data of a fetched chunk, or the typed error its status stands for."""
    if chunk.status == "ok" and chunk.data is not None:
        return chunk.data
    if chunk.status == "corrupt":
        raise FormatError("stored payload", 0, key.group, "checksum mismatch; the store removed its copy")
    raise errors.ChunkNotFound(f"no chunk {key.group} level {key.level} in the remote store")
