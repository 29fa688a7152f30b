"""ASGI middleware: a request id on every request (and in its logs), the body size limit, and an access log line.

Pure ASGI (not ``BaseHTTPMiddleware``) so streaming responses pass through untouched.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import Any

from starlette.exceptions import HTTPException

from cachegen import obs
from server.api.errors import error_type
from server.api.schemas import error_body

log = logging.getLogger(__name__)

Scope = dict[str, Any]
_QUIET_PATHS = frozenset({"/health", "/metrics"})  # polled; logged at DEBUG only


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a body passes the limit; FastAPI lets HTTPExceptions through to the handlers."""

    def __init__(self, max_body_bytes: int) -> None:
        super().__init__(413, f"request body is larger than {max_body_bytes} bytes")


class RequestMiddleware:
    """Gives each HTTP request ``request.state.request_id`` (from ``X-Request-Id`` or random), echoes it in the
    response, refuses bodies over ``max_body_bytes`` with 413, and logs one line per request."""

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = (_header(scope, b"x-request-id") or "")[:64] or f"req-{secrets.token_hex(8)}"
        scope.setdefault("state", {})["request_id"] = request_id
        started, status = time.perf_counter(), [0]
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(send, request_id)
            status[0] = 413
        else:
            await self._forward(scope, receive, send, request_id, status)
        route = scope.get("route").path if scope.get("route") is not None else "other"
        obs.API_REQUESTS.labels(route=route, status=str(status[0])).inc()
        level = logging.DEBUG if scope["path"] in _QUIET_PATHS else logging.INFO
        log.log(
            level, "http request_id=%s method=%s path=%s status=%d ms=%.1f",
            request_id, scope["method"], scope["path"], status[0], 1e3 * (time.perf_counter() - started),
        )  # fmt: skip

    async def _forward(self, scope: Scope, receive: Any, send: Any, request_id: str, status: list[int]) -> None:
        received = [0]

        async def limited_receive() -> dict[str, Any]:
            message = await receive()
            received[0] += len(message.get("body", b""))
            if received[0] > self.max_body_bytes:
                raise BodyTooLarge(self.max_body_bytes)
            return message

        async def tagged_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        await self.app(scope, limited_receive, tagged_send)

    async def _too_large(self, send: Any, request_id: str) -> None:
        message = f"request body is larger than {self.max_body_bytes} bytes"
        body = json.dumps(error_body(message, error_type(413), "body_too_large")).encode()
        headers = [(b"content-type", b"application/json"), (b"x-request-id", request_id.encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
