"""API keys -> tenants. The tenant becomes vLLM's ``cache_salt``, so tenants never share KV (DESIGN.md §10).

Keys come from ``settings.server.api_keys`` (key -> tenant) and ``api_keys_file`` (``tenant key`` per line, ``#``
comments). Keys are held only as SHA-256 digests and compared in constant time per digest lookup. With no keys
configured the server is open and every caller is ``default_tenant``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from fastapi import Request

from cachegen.config import ServerSettings
from server.api.errors import ApiError
from server.tenant_keys import read_tenant_keys

_TENANT_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_MIN_KEY_CHARS = 8


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _check_tenant(tenant: str) -> str:
    if not _TENANT_RE.fullmatch(tenant):
        raise ValueError(f"tenant must match {_TENANT_RE.pattern}, got {tenant!r}")
    return tenant


@dataclass(frozen=True, slots=True)
class ApiKeys:
    """Digest of each key -> tenant; empty means open (everyone is ``default_tenant``)."""

    tenants: dict[bytes, str]
    default_tenant: str

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]], default_tenant: str) -> ApiKeys:
        tenants = {}
        for key, tenant in pairs:
            if len(key) < _MIN_KEY_CHARS:
                raise ValueError(f"API key of tenant {tenant!r} has {len(key)} characters; {_MIN_KEY_CHARS} needed")
            tenants[_digest(key)] = _check_tenant(tenant)
        return cls(tenants, _check_tenant(default_tenant))

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> ApiKeys:
        pairs = list(settings.api_keys.items())
        if settings.api_keys_file is not None:
            pairs += [(key, tenant) for tenant, key in read_tenant_keys(settings.api_keys_file)]
        return cls.from_pairs(pairs, settings.default_tenant)

    @property
    def is_open(self) -> bool:
        return not self.tenants

    def tenant_for(self, authorization: str | None) -> str:
        """The tenant of an ``Authorization`` header value; ApiError 401 for a missing or unknown key."""
        if self.is_open:
            return self.default_tenant
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", "invalid_api_key")
        tenant = self.tenants.get(_digest(key.strip()))
        if tenant is None:
            raise ApiError(401, "incorrect API key provided", "invalid_api_key")
        return tenant


def tenant_of(request: Request) -> str:
    """FastAPI dependency: the caller's tenant."""
    keys: ApiKeys = request.app.state.api_keys
    return keys.tenant_for(request.headers.get("authorization"))
