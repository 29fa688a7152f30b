"""Store wire pieces, hostile input, error <-> status mapping, tokens and the Fetch plan; no network."""

from __future__ import annotations

import asyncio
import zlib
from pathlib import Path

import grpc
import pytest

from cachegen import errors
from cachegen.errors import Unauthenticated
from cachegen.spec import ChunkKey
from cachegen.store import ClientOptions
from cachegen.store.wire import (
    MAX_PAYLOAD_BYTES,
    PIECE_BYTES,
    Assembler,
    FetchAssembler,
    error_from_rpc,
    fetch_pieces,
    pb,
    put_pieces,
    status_of,
)
from server.kvstore.auth import TokenTable
from server.kvstore.fetch import FetchPlan

KEY = ChunkKey(b"m" * 16, b"l" * 16, b"p" * 32, 3, 1)


@pytest.mark.parametrize("size", [0, 1, PIECE_BYTES, PIECE_BYTES + 1, 3 * PIECE_BYTES + 12345])
def test_put_pieces_round_trip(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    pieces = list(put_pieces(KEY, data))
    assert all(len(p.data) <= PIECE_BYTES for p in pieces) and pieces[-1].crc32 == zlib.crc32(data)
    assembler = Assembler(pieces[0].total_bytes)
    results = [assembler.add(p.offset, p.total_bytes, p.data, p.crc32) for p in pieces]
    assert results[:-1] == [None] * (len(pieces) - 1) and results[-1] == data


def test_assembler_rejects_hostile_pieces() -> None:
    with pytest.raises(errors.InvalidRequest, match="exceeds"):
        Assembler(MAX_PAYLOAD_BYTES + 1)
    with pytest.raises(errors.InvalidRequest, match="expected 0"):
        Assembler(10).add(5, 10, b"x", 0)
    with pytest.raises(errors.InvalidRequest, match="overruns"):
        Assembler(3).add(0, 3, b"abcd", 0)
    with pytest.raises(errors.InvalidRequest):
        Assembler(3).add(0, 4, b"abc", 0)  # total changed mid-payload
    with pytest.raises(errors.FormatError, match="crc32"):
        Assembler(3).add(0, 3, b"abc", zlib.crc32(b"abd"))


def test_fetch_assembler_statuses_and_corruption() -> None:
    assembler = FetchAssembler()
    messages = list(fetch_pieces(0, 2, b"z" * (PIECE_BYTES + 5)))
    assert assembler.feed(messages[0]) is None
    chunk = assembler.feed(messages[1])
    assert (chunk.index, chunk.level, chunk.status, len(chunk.data)) == (0, 2, "ok", PIECE_BYTES + 5)
    missing = assembler.feed(pb.FetchResponse(index=1, level=0, status=pb.CHUNK_STATUS_NOT_FOUND))
    assert (missing.status, missing.data) == ("not_found", None)
    (bad,) = fetch_pieces(2, 0, b"abc")
    bad.data = b"abd"
    assert assembler.feed(bad).status == "corrupt"


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, trailing: tuple = ()) -> None:
        self._code, self._trailing = code, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "details"

    def trailing_metadata(self) -> tuple:
        return self._trailing


@pytest.mark.parametrize(
    ("code", "trailing", "expected"),
    [
        (grpc.StatusCode.UNAVAILABLE, (), errors.StoreUnavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, (), errors.DeadlineExceeded),
        (grpc.StatusCode.UNAUTHENTICATED, (), Unauthenticated),
        (grpc.StatusCode.DATA_LOSS, (), errors.FormatError),
        (grpc.StatusCode.FAILED_PRECONDITION, (("cachegen-error", "UnsupportedVersion"),), errors.UnsupportedVersion),
        (grpc.StatusCode.INTERNAL, (), errors.StoreUnavailable),
    ],
)
def test_error_from_rpc(code: grpc.StatusCode, trailing: tuple, expected: type) -> None:
    error = error_from_rpc(_FakeRpcError(code, trailing), "host:1")
    assert type(error) is expected and "host:1" in str(error)


def test_status_of_follows_the_table() -> None:
    assert status_of(errors.ChunkNotFound("x")) == grpc.StatusCode.NOT_FOUND
    assert status_of(errors.FormatError("f", 0, 1)) == grpc.StatusCode.DATA_LOSS
    assert status_of(Unauthenticated("x")) == grpc.StatusCode.UNAUTHENTICATED
    assert status_of(KeyError("x")) == grpc.StatusCode.INTERNAL


def test_token_table(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# tenant token\nalice alice-secret-1\n\nbob   bob-secret-22  # trailing comment\n")
    table = TokenTable.from_file(path)
    assert table.tenant_for((("authorization", "Bearer alice-secret-1"),)) == "alice"
    assert table.tenant_for((("authorization", "bearer bob-secret-22"),)) == "bob"
    assert table.tenant_for((("authorization", "Bearer nope-nope-nope"),)) is None
    assert table.tenant_for(()) is None
    assert TokenTable.from_string("carol:carol-token-1").tenant_for((("authorization", "Bearer carol-token-1"),))
    assert TokenTable((), is_open=True).tenant_for(()) == "default"
    for bad in ("alice:short", "../x:long-enough-token", "no-colon"):
        with pytest.raises(errors.InvalidRequest):
            TokenTable.from_string(bad)


def test_fetch_plan_applies_changes_only_to_chunks_not_started() -> None:
    async def scenario() -> list:
        plan = FetchPlan()
        keys = [ChunkKey(b"m" * 16, b"l" * 16, bytes([i]) * 32, i, 0).to_bytes() for i in range(3)]
        plan.add(pb.FetchRequest(keys=keys))
        first = await plan.take(0)
        plan.add(pb.FetchRequest(changes=[pb.LevelChange(index=0, level=5), pb.LevelChange(index=1, level=2),
                                          pb.LevelChange(index=2, skip=True)]))  # fmt: skip
        second, third = await plan.take(1), await plan.take(2)
        waiter = asyncio.create_task(plan.take(3))
        await asyncio.sleep(0)
        plan.close()
        with pytest.raises(errors.InvalidRequest):
            plan.add(pb.FetchRequest(changes=[pb.LevelChange(index=9, level=1)]))
        return [first[1], second[1], third[1], await waiter]

    assert asyncio.run(scenario()) == [0, 2, None, None]


def test_client_options_from_url() -> None:
    options = ClientOptions.from_url("grpc://10.0.0.1:5000?token=abc&timeout_s=2.5")
    assert (options.address, options.token, options.timeout_s) == ("10.0.0.1:5000", "abc", 2.5)
    assert options.metadata() == (("authorization", "Bearer abc"),)
    for bad in ("grpc://", "http://x:1", "grpc://x:1?timeout_s=soon"):
        with pytest.raises(errors.InvalidRequest):
            ClientOptions.from_url(bad)


def test_generated_code_matches_the_proto() -> None:
    import hashlib

    from cachegen.store import _proto

    source = Path(_proto.__file__).resolve().parents[3] / "proto/cachegen/kvstore/v1/kvstore.proto"
    stamp = (Path(_proto.__file__).parent / "kvstore_pb2.py").read_text().splitlines()[0]
    assert stamp.endswith(hashlib.sha256(source.read_bytes()).hexdigest())
