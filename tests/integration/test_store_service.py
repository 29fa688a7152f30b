"""The gRPC store service as a real process over the disk backend: the behaviours issue 4 asks to be shown."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cachegen.errors import ChunkNotFound, DeadlineExceeded, InvalidRequest, StoreUnavailable, Unauthenticated
from cachegen.spec import ChunkKey
from cachegen.store import AsyncStoreClient, ChunkInfo, ClientOptions, StoreClient, open_store
from tests.integration import store_fixtures
from tests.integration.store_fixtures import TOKENS, free_port

store_factory = store_fixtures.store_factory  # a fixture: real `cachegen store serve` processes
MODEL, LAYOUT = b"M" * 16, b"L" * 16


def key(index: int, level: int = 0, context: bytes = b"doc") -> ChunkKey:
    prefix = hashlib.blake2b(context + index.to_bytes(4, "little"), digest_size=32).digest()
    return ChunkKey(MODEL, LAYOUT, prefix, index, level)


def client(server, tenant: str = "alice", timeout_s: float = 10.0) -> StoreClient:
    return StoreClient(ClientOptions(server.address, TOKENS.get(tenant, tenant), timeout_s))


def payload(index: int, level: int, size: int) -> bytes:
    return hashlib.sha256(f"{index}/{level}".encode()).digest() * (size // 32) + b"x" * (size % 32)


def test_multi_level_put_lookup_fetch(store_factory) -> None:
    server = store_factory()
    with client(server) as store:
        for index in range(3):
            stored = store.put_levels({key(index, 0): payload(index, 0, 3000), key(index, 2): payload(index, 2, 300)})
            assert stored == {0: 3000, 2: 300}
        store.put(key(4, 1), b"beyond the gap")
        assert store.lookup([key(i) for i in range(5)]) == [ChunkInfo({0: 3000, 2: 300})] * 3
        chunks = list(store.fetch([key(0, 2), key(1, 0), key(2, 1), key(3, 0)]))
        assert [(c.index, c.level, c.status) for c in chunks] == [
            (0, 2, "ok"), (1, 0, "ok"), (2, 1, "not_found"), (3, 0, "not_found")
        ]  # fmt: skip
        assert chunks[0].data == payload(0, 2, 300) and chunks[1].data == payload(1, 0, 3000)
        assert store.delete(key(1)) == 2
        with pytest.raises(ChunkNotFound):
            store.get(key(1, 0))
        stats = store.stats()
        assert (stats.backend, stats.num_chunks, stats.num_payloads) == ("disk", 3, 5)


def test_large_context_streamed_in_small_messages(store_factory) -> None:
    """Chunks of 6 MiB (over gRPC's 4 MiB default limit) travel as 1 MiB pieces; no limit is raised."""
    server = store_factory()
    size = 6 << 20
    with client(server) as store:
        for index in range(4):
            store.put(key(index), payload(index, 0, size))
        received = list(store.fetch([key(i) for i in range(4)]))
        assert [c.data == payload(c.index, 0, size) for c in received] == [True] * 4


def test_levels_changed_while_streaming(store_factory) -> None:
    server = store_factory()
    num_chunks = 8
    with client(server) as store:
        for index in range(num_chunks):
            store.put_levels({key(index, 0): payload(index, 0, 1 << 20), key(index, 1): payload(index, 1, 1000)})
        stream = store.fetch([key(i, 0) for i in range(num_chunks)])
        stream.change_level(num_chunks - 1, 1)  # long before the server reaches the last chunk
        stream.skip(num_chunks - 2)
        seen = []
        for chunk in stream:
            if chunk.index == 0:
                stream.change_level(0, 1)  # already sent: ignored
            seen.append((chunk.index, chunk.level, chunk.status))
            if chunk.status == "ok":
                assert chunk.data == payload(chunk.index, chunk.level, len(chunk.data))
    assert seen[0] == (0, 0, "ok")
    assert seen[-2:] == [(6, 0, "skipped"), (7, 1, "ok")]


def test_concurrent_writers_and_readers(store_factory) -> None:
    server = store_factory()
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            with client(server) as store:
                for round_ in range(6):
                    store.put(key(round_, 0, b"shared"), payload(round_, 0, 200_000))  # every worker, same keys
                    store.put(key(round_, worker, b"shared"), payload(round_, worker, 50_000))
                    data = store.get(key(round_, 0, b"shared"))
                    assert data == payload(round_, 0, 200_000)
                    assert len(store.lookup([key(i, 0, b"shared") for i in range(round_ + 1)])) == round_ + 1
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    with client(server) as store:
        assert store.lookup([key(0, 0, b"shared")]) == [
            ChunkInfo({0: 200_000, 1: 50_000, 2: 50_000, 3: 50_000, 4: 50_000})
        ]


def test_restart_loses_nothing_acknowledged(store_factory, tmp_path: Path) -> None:
    backend = f"disk://{tmp_path / 'durable'}"  # fsync on: acknowledged means on disk
    server = store_factory(backend)
    with client(server) as store:
        for index in range(10):
            store.put(key(index), payload(index, 0, 100_000))
    server.kill()  # SIGKILL straight after the last acknowledgement
    restarted = store_factory(backend)
    with client(restarted) as store:
        assert len(store.lookup([key(i) for i in range(10)])) == 10
        assert all(store.get(key(i)) == payload(i, 0, 100_000) for i in range(10))


def test_corrupted_payload_detected_on_fetch(store_factory, tmp_path: Path) -> None:
    server = store_factory(f"disk://{tmp_path / 'kv'}?fsync=0")
    with client(server) as store:
        store.put(key(0), payload(0, 0, 100_000))
        store.put(key(1), payload(1, 0, 100_000))
        (path,) = (p for p in (tmp_path / "kv").rglob("*.kv") if p.name.startswith(key(0).group))
        blob = bytearray(path.read_bytes())
        blob[5000] ^= 1
        path.write_bytes(bytes(blob))
        statuses = [c.status for c in store.fetch([key(0), key(1)])]
        assert statuses == ["corrupt", "ok"]
        with pytest.raises(ChunkNotFound):  # the corrupt copy was removed; a re-put repairs it
            store.get(key(0))


def test_tenants_are_isolated(store_factory) -> None:
    server = store_factory()
    with client(server, "alice") as alice, client(server, "bob") as bob:
        alice.put(key(0), b"alice's secret")
        assert bob.lookup([key(0)]) == []
        with pytest.raises(ChunkNotFound):
            bob.get(key(0))
        assert bob.delete(key(0)) == 0
        bob.put(key(0), b"bob's")
        assert alice.get(key(0)) == b"alice's secret"
        assert bob.get(key(0)) == b"bob's"


def test_wrong_token_refused_but_health_and_reflection_open(store_factory) -> None:
    server = store_factory()
    for token in ("not-a-token", None):
        with StoreClient(ClientOptions(server.address, token)) as intruder:
            for call in (lambda: intruder.lookup([key(0)]), lambda: intruder.put(key(0), b"x")):
                with pytest.raises(Unauthenticated):
                    call()
            with pytest.raises(Unauthenticated):
                list(intruder.fetch([key(0)]))
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="cachegen.kvstore.v1.KVStore")
        assert health.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for reply in replies for s in reply.list_services_response.service}
        assert "cachegen.kvstore.v1.KVStore" in names


def test_bad_requests_are_typed(store_factory) -> None:
    server = store_factory()
    with client(server) as store, pytest.raises(InvalidRequest):
        store.put_levels({key(0, 0): b"a", key(1, 0): b"b"})  # two chunks in one Put


def test_deadline_ends_a_slow_stream(store_factory) -> None:
    server = store_factory()
    with client(server) as store:
        store.put(key(0), os.urandom(2 << 20))
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            for _ in store.fetch([key(0)] * 100, timeout_s=0.5):
                time.sleep(0.05)  # a slow reader: 100 chunks would take 5 s
        assert time.monotonic() - start < 2.0


def test_async_client(store_factory) -> None:
    server = store_factory()

    async def scenario() -> None:
        async with AsyncStoreClient(ClientOptions(server.address, TOKENS["alice"])) as store:
            assert await store.put_levels({key(0, 0): payload(0, 0, 3 << 20), key(0, 1): b"b"}) == {0: 3 << 20, 1: 1}
            await store.put_levels({key(1, 0): b"c", key(1, 1): b"d"})
            infos = await store.lookup([key(i) for i in range(3)])
            assert infos == [ChunkInfo({0: 3 << 20, 1: 1}), ChunkInfo({0: 1, 1: 1})]
            stream = store.fetch([key(0, 0), key(1, 0), key(2, 0)])
            await stream.change_level(1, 1)  # chunk 0 (3 MiB) is still on its way: this applies
            await stream.skip(2)
            seen = [(c.index, c.level, c.status, c.data) async for c in stream]
            assert seen[1:] == [(1, 1, "ok", b"d"), (2, 0, "skipped", None)]
            assert await store.get(key(0, 0)) == payload(0, 0, 3 << 20)
            with pytest.raises(ChunkNotFound):
                await store.get(key(5))
            assert (await store.stats()).num_payloads == 4
            assert await store.delete(key(0)) == 2
        async with AsyncStoreClient(ClientOptions(server.address, "wrong-token")) as intruder:
            with pytest.raises(Unauthenticated):
                await intruder.lookup([key(1)])

    asyncio.run(scenario())


def test_killed_store_mid_stream_gives_typed_error_quickly(store_factory) -> None:
    server = store_factory()
    with client(server) as store:
        for index in range(6):
            store.put(key(index), os.urandom(4 << 20))
        stream = store.fetch([key(i) for i in range(6)] * 20)
        iterator = iter(stream)
        next(iterator)
        server.kill()
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            for _ in iterator:
                pass
        assert time.monotonic() - start < 2.0
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.lookup([key(0)])
        assert time.monotonic() - start < 2.0


def test_down_store_is_unavailable_quickly() -> None:
    start = time.monotonic()
    store = open_store(f"grpc://127.0.0.1:{free_port()}?token=x&timeout_s=5")
    with pytest.raises(StoreUnavailable):
        store.lookup([key(0)])
    with pytest.raises(StoreUnavailable):
        store.get(key(0))
    assert time.monotonic() - start < 2.0
    store.close()


def test_corruption_in_flight_is_not_served(store_factory) -> None:
    """The Put's CRC guards the upload: a piece altered in flight is refused, nothing is stored."""
    from cachegen.store.wire import pb, pb_grpc, put_pieces

    server = store_factory()
    pieces = list(put_pieces(key(0), payload(0, 0, 3 << 20)))
    pieces[1] = pb.Piece(key=pieces[1].key, offset=pieces[1].offset, total_bytes=pieces[1].total_bytes,
                         data=b"\0" * len(pieces[1].data))  # fmt: skip
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Put(iter(pieces), timeout=10, metadata=(("authorization", f"Bearer {TOKENS['alice']}"),))
        assert caught.value.code() == grpc.StatusCode.DATA_LOSS
    with client(server) as store:
        assert store.lookup([key(0)]) == []


def test_prometheus_metrics(store_factory) -> None:
    import httpx

    port = free_port()
    server = store_factory(None, "--metrics-port", str(port))
    with client(server) as store:
        store.put(key(0), b"x" * 1000)
        store.lookup([key(0), key(1)])
        list(store.fetch([key(0), key(1)]))
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert 'cachegen_store_requests_total{method="Lookup",status="OK"} 1.0' in text
    assert 'cachegen_store_lookup_chunks_total{result="hit"} 1.0' in text
    assert 'cachegen_store_lookup_chunks_total{result="miss"} 1.0' in text
    assert 'cachegen_store_payload_bytes_total{direction="in"} 1000.0' in text
    assert 'cachegen_store_fetch_chunks_total{status="not_found"} 1.0' in text
    assert "cachegen_store_request_seconds_bucket" in text
