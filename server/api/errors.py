"""OpenAI-shaped error responses: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

cachegen's own errors get their HTTP status from the one table in ``cachegen.errors``; errors only the API knows
(unknown model or context, bad API key, too large) are ``ApiError``s. Unknown exceptions become a generic 500 and
the detail goes to the log with the request id.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cachegen.errors import CacheGenError, ModelNotReady, status_for
from server.api.schemas import error_body

log = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def error_type(status: int) -> str:
    return _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


class ApiError(Exception):
    """An error the API answers as is: status, message and OpenAI's ``code``/``param``."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_response(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, error_type(status), code, param), status_code=status)


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "-")


async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    log.info("request rejected request_id=%s status=%d code=%s", _request_id(request), exc.status, exc.code)
    return error_response(exc.status, exc.message, exc.code, exc.param)


async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if param:
        message = f"{param}: {message}"
    return error_response(400, message, "invalid_request", param)


async def _on_cachegen(request: Request, exc: CacheGenError) -> JSONResponse:
    _, status = status_for(exc)
    if status >= 500 and not isinstance(exc, ModelNotReady):  # "still starting" is expected, not worth a warning
        log.warning("request failed request_id=%s error=%s", _request_id(request), exc)
    return error_response(status, str(exc), type(exc).__name__)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = "no such route" if exc.status_code == 404 else str(exc.detail)
    return error_response(exc.status_code, message, _HTTP_CODES.get(exc.status_code))


async def _on_unknown(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error request_id=%s", _request_id(request))
    return error_response(500, f"internal error (request id {_request_id(request)})", "internal_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(CacheGenError, _on_cachegen)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_unknown)
