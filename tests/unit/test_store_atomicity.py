"""Disk backend under concurrency: readers in other threads and processes never see a partial payload."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

from cachegen.errors import ChunkNotFound
from cachegen.spec import ChunkKey
from cachegen.store import DiskBackend

KEY = ChunkKey(b"m" * 16, b"l" * 16, b"p" * 32, 0, 0)
PAYLOAD_BYTES = 512 << 10
NUM_WRITES = 40


def _payload(i: int) -> bytes:
    return bytes([i % 251]) * PAYLOAD_BYTES


def _write_many(root: str, first: int) -> None:
    store = DiskBackend(root, is_durable=False)
    for i in range(first, first + NUM_WRITES):
        store.put(KEY, _payload(i))


def _check_reads(store: DiskBackend, stop: threading.Event) -> int:
    num_seen = 0
    while not stop.is_set():
        try:
            data = store.get(KEY)
        except ChunkNotFound:
            continue
        assert len(data) == PAYLOAD_BYTES and data.count(data[:1]) == PAYLOAD_BYTES, "torn read"
        num_seen += 1
    return num_seen


def test_readers_never_see_half_a_payload_threads_and_processes(tmp_path: Path) -> None:
    store = DiskBackend(tmp_path, is_durable=False)
    stop = threading.Event()
    results: list[int] = []
    reader = threading.Thread(target=lambda: results.append(_check_reads(store, stop)))
    reader.start()
    process = multiprocessing.get_context("spawn").Process(target=_write_many, args=(str(tmp_path), 1000))
    process.start()
    _write_many(str(tmp_path), 0)  # a writer thread here while another process writes the same key
    process.join(timeout=60)
    stop.set()
    reader.join(timeout=10)
    assert process.exitcode == 0
    assert results and results[0] > 0
    assert len(list(tmp_path.rglob(".tmp-*"))) == 0
    assert len(store.get(KEY)) == PAYLOAD_BYTES


def _read_in_child(root: str, queue: multiprocessing.Queue) -> None:
    store = DiskBackend(root, is_durable=False)
    stop = threading.Event()
    timer = threading.Timer(1.0, stop.set)
    timer.start()
    try:
        queue.put(_check_reads(store, stop))
    except AssertionError as exc:
        queue.put(str(exc))


def test_reader_in_other_process(tmp_path: Path) -> None:
    DiskBackend(tmp_path, is_durable=False).put(KEY, _payload(0))
    ctx = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue = ctx.Queue()
    process = ctx.Process(target=_read_in_child, args=(str(tmp_path), queue))
    process.start()
    _write_many(str(tmp_path), 1)
    result = queue.get(timeout=60)
    process.join(timeout=10)
    assert isinstance(result, int) and result > 0, result
