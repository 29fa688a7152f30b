"""Bearer tokens -> tenants, and the server interceptor that refuses calls without a known token.

Tokens come from a file (``tenant token`` per line, ``#`` comments) or a ``tenant:token,tenant:token`` string
that the entry point reads from the environment. Tokens are held only as SHA-256 digests.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path

import grpc

from cachegen.errors import InvalidRequest
from cachegen.store.backends import DEFAULT_NAMESPACE, check_namespace
from cachegen.store.wire import SERVICE_NAME
from server.tenant_keys import read_tenant_keys

log = logging.getLogger(__name__)

_GUARDED_PREFIX = f"/{SERVICE_NAME}/"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenTable:
    """Maps bearer tokens to tenant names. An open table (no tokens) maps every call to the default tenant."""

    def __init__(self, pairs: Iterable[tuple[str, str]], *, is_open: bool = False) -> None:
        self.is_open = is_open
        self._tenants: dict[bytes, str] = {}
        for tenant, token in pairs:
            if len(token) < 8:
                raise InvalidRequest(f"token of tenant {tenant!r} is {len(token)} characters; at least 8 needed")
            self._tenants[_digest(token)] = check_namespace(tenant)

    @classmethod
    def from_file(cls, path: Path) -> TokenTable:
        return cls(read_tenant_keys(path))

    @classmethod
    def from_string(cls, text: str) -> TokenTable:
        pairs = []
        for item in filter(None, (part.strip() for part in text.split(","))):
            tenant, sep, token = item.partition(":")
            if not sep:
                raise InvalidRequest(f"token entry must be tenant:token, got {tenant!r}:…")
            pairs.append((tenant, token))
        return cls(pairs)

    def __len__(self) -> int:
        return len(self._tenants)

    def tenant_for(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        """The tenant of a call's metadata, or None when the token is missing or unknown."""
        if self.is_open:
            return DEFAULT_NAMESPACE
        for name, value in metadata or ():
            if name == "authorization" and isinstance(value, str):
                scheme, _, token = value.partition(" ")
                if scheme.lower() == "bearer":
                    return self._tenants.get(_digest(token.strip()))
        return None


async def _deny(request_or_iterator: object, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses KVStore calls without a known bearer token; health and reflection stay open."""

    def __init__(self, tokens: TokenTable) -> None:
        self._tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(_GUARDED_PREFIX):
            return handler
        if self._tokens.tenant_for(handler_call_details.invocation_metadata) is not None:
            return handler
        log.warning("call refused method=%s reason=unauthenticated", method)
        return _denying_handler(handler)


def _denying_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that fails with UNAUTHENTICATED."""
    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_deny, **codecs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_deny, **codecs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_deny, **codecs)
    return grpc.unary_unary_rpc_method_handler(_deny, **codecs)
