"""The one file format for tenant credentials, shared by the HTTP API keys and the KV store's bearer tokens."""

from __future__ import annotations

from pathlib import Path

from cachegen.errors import InvalidRequest


def read_tenant_keys(path: Path) -> list[tuple[str, str]]:
    """``tenant secret`` per line ('#' starts a comment) -> (tenant, secret) pairs, in file order."""
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2:
            raise InvalidRequest(f"{path}:{number}: expected 'tenant secret', got {len(fields)} fields")
        pairs.append((fields[0], fields[1]))
    return pairs
