"""Assemble and run the store's gRPC server: KVStore servicer, auth, grpc.health.v1 and reflection."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cachegen.store.backends import TenantStore
from cachegen.store.wire import SERVICE_NAME, pb_grpc
from server.kvstore.auth import AuthInterceptor, TokenTable
from server.kvstore.servicer import KVStoreServicer

log = logging.getLogger(__name__)

_SERVER_OPTIONS = [
    # Clients ping every 10 s to notice a dead store; allow it, and ping idle clients ourselves.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


@dataclass(frozen=True, slots=True)
class ServeOptions:
    listen: str  # HOST:PORT; port 0 picks a free one
    ready_file: Path | None = None  # written with HOST:PORT once the server accepts calls
    grace_s: float = 2.0


async def start_server(backend: TenantStore, tokens: TokenTable, listen: str) -> tuple[grpc.aio.Server, int]:
    """A started server and its bound port."""
    server = grpc.aio.server(interceptors=[AuthInterceptor(tokens)], options=_SERVER_OPTIONS)
    pb_grpc.add_KVStoreServicer_to_server(KVStoreServicer(backend, tokens), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    for service in (SERVICE_NAME, ""):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, port


def _write_ready_file(path: Path, address: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(address)
    os.replace(tmp, path)


async def serve(backend: TenantStore, tokens: TokenTable, options: ServeOptions) -> None:
    """Serve until SIGINT or SIGTERM, then drain calls for ``grace_s`` seconds."""
    server, port = await start_server(backend, tokens, options.listen)
    host = options.listen.rsplit(":", 1)[0]
    address = f"{host}:{port}"
    log.info("store listening address=%s tenants=%d open=%s", address, len(tokens), tokens.is_open)
    if options.ready_file is not None:
        _write_ready_file(options.ready_file, address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("store stopping grace_s=%.1f", options.grace_s)
    await server.stop(options.grace_s)
    backend.close()
