"""`cachegen store serve`: run the KV store service.

Settings come from the environment (``CACHEGEN_STORE__URL``, ``CACHEGEN_STORE__CAPACITY_BYTES``, ...), flags
override them. Tokens: ``--tokens-file`` (``tenant token`` per line) or ``CACHEGEN_STORE_TOKENS`` as
``tenant:token,tenant:token``; ``--no-auth`` serves everyone as the default tenant (local development only).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.kvstore.auth import TokenTable

log = logging.getLogger(__name__)

TOKENS_ENV = "CACHEGEN_STORE_TOKENS"


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    serve = sub.add_parser("serve", help="serve the KV store over gRPC")
    serve.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT (port 0 picks a free port)")
    serve.add_argument("--backend", default=None, help="disk:///path, memory://, redis://h:p, redis-cluster://h:p,..")
    serve.add_argument("--capacity-bytes", type=int, default=None, help="bound of the disk/memory backend")
    serve.add_argument("--tokens-file", type=Path, default=None, help="'tenant token' per line")
    serve.add_argument("--no-auth", action="store_true", help="accept calls without tokens (default tenant)")
    serve.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0: off)")
    serve.add_argument("--ready-file", type=Path, default=None, help="write HOST:PORT here once serving")


def _tokens(args: argparse.Namespace) -> TokenTable:
    from server.kvstore.auth import TokenTable

    if args.no_auth:
        return TokenTable((), is_open=True)
    if args.tokens_file is not None:
        return TokenTable.from_file(args.tokens_file)
    return TokenTable.from_string(os.environ.get(TOKENS_ENV, ""))


def run(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from cachegen import obs
    from cachegen.config import Settings
    from cachegen.errors import CacheGenError
    from cachegen.store.backends import TenantStore, open_store
    from server.kvstore.app import ServeOptions, serve

    settings = Settings.from_env()
    obs.configure_logging(settings.log)
    try:
        tokens = _tokens(args)
        if not len(tokens) and not tokens.is_open:
            print(f"no tokens: pass --tokens-file, set {TOKENS_ENV}, or --no-auth", file=sys.stderr)
            return 2
        url = args.backend or settings.store_url()
        backend = open_store(url, args.capacity_bytes or settings.store.capacity_bytes)
    except CacheGenError as exc:
        print(f"cannot start the store: {exc}", file=sys.stderr)
        return 2
    if not isinstance(backend, TenantStore):
        print(f"backend {url!r} cannot be served (it has no tenant namespaces)", file=sys.stderr)
        return 2
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.listen.rsplit(":", 1)[0])
    asyncio.run(serve(backend, tokens, ServeOptions(args.listen, args.ready_file)))
    return 0


if __name__ == "__main__":
    from server.cli import main

    sys.exit(main(["store", *sys.argv[1:]]))
