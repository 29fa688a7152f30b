"""The FastAPI app factory. Nothing is created at import time: ``create_app(settings, engine)`` builds one app,
whose state (settings, engine, API keys, contexts, store handle) lives on ``app.state``.

The engine starts in a thread once the app serves, so ``/health`` answers 503 until it is ready; expired contexts
are swept periodically.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI

from cachegen import obs
from cachegen.config import Settings
from cachegen.store import KVStore, open_store
from server.api import context_routes, routes
from server.api.auth import ApiKeys
from server.api.contexts import ContextService
from server.api.engine_host import Engine
from server.api.errors import install_error_handlers
from server.api.middleware import RequestMiddleware
from server.api.registry import ContextRegistry

log = logging.getLogger(__name__)


def open_api_store(settings: Settings) -> KVStore:
    """The store handle the API uses for context lookups and deletes (the connector opens its own)."""
    return open_store(settings.store.resolved_url(settings.store_url()), settings.store.capacity_bytes)


async def _start_engine(engine: Engine) -> None:
    start = getattr(engine, "start", None)
    if start is None or engine.is_ready:
        return
    with contextlib.suppress(Exception):  # the failure is kept on the engine and shown by /health
        await asyncio.to_thread(start)


async def _sweep_contexts(app: FastAPI) -> None:
    service: ContextService = app.state.contexts
    period_s = app.state.settings.server.context_sweep_s
    while True:
        await asyncio.sleep(period_s)
        if not app.state.engine.is_ready:
            continue
        try:
            if num_expired := await service.expire():
                log.info("contexts expired count=%d", num_expired)
        except Exception:  # the sweep must outlive one bad record or a store hiccup
            log.exception("context sweep failed")


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(_start_engine(app.state.engine)), asyncio.create_task(_sweep_contexts(app))]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await app.state.contexts.close()
        shutdown = getattr(app.state.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()
        app.state.contexts.store.close()
        if app.state.owned_metrics_dir is not None:  # the engine's processes have stopped writing there
            shutil.rmtree(app.state.owned_metrics_dir, ignore_errors=True)


def create_app(
    settings: Settings,
    engine: Engine,
    store: KVStore | None = None,
    metrics_dir: Path | None = None,
    *,
    is_metrics_dir_owned: bool = False,
) -> FastAPI:
    """One app serving ``engine``; ``store`` defaults to the configured store. ``metrics_dir``: prometheus_client's
    multiprocess directory when this process runs in that mode (``/metrics`` then covers vLLM's child processes);
    ``is_metrics_dir_owned``: remove it on shutdown."""
    app = FastAPI(title="cachegen", version="0.1.0", lifespan=_lifespan, docs_url="/docs", redoc_url=None)
    app.state.settings = settings
    app.state.engine = engine
    app.state.api_keys = ApiKeys.from_settings(settings.server)
    app.state.created = int(time.time())
    app.state.metrics_registry = obs.metrics_registry(metrics_dir)
    app.state.owned_metrics_dir = metrics_dir if is_metrics_dir_owned else None
    app.state.contexts = ContextService(
        ContextRegistry(settings.contexts_dir()), store or open_api_store(settings), engine, settings.server
    )
    install_error_handlers(app)
    app.add_middleware(RequestMiddleware, max_body_bytes=settings.server.max_body_bytes)
    app.include_router(routes.router)
    app.include_router(context_routes.router)
    return app
