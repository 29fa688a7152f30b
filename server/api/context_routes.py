"""``/v1/contexts``: create (text or chat messages), get, list, patch (TTL / expire_time), delete.

Shapes follow Gemini's ``cachedContents`` in OpenAI's naming style: ``{"id", "object": "context", "model",
"display_name", "create_time", "update_time", "expire_time" (RFC 3339), "usage": {"total_tokens"}, "state",
"progress": {"stored_chunks", "total_chunks"}}``. ``POST`` waits until every chunk is stored (``"wait": false``
returns at once with ``state: PROCESSING`` and 202; poll ``GET`` for progress).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from server.api.auth import tenant_of
from server.api.contexts import ContextService
from server.api.generation import check_model
from server.api.registry import ContextRecord
from server.api.schemas import ContextCreate, ContextUpdate

router = APIRouter(prefix="/v1/contexts")


def _rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def context_view(record: ContextRecord) -> dict[str, Any]:
    """The public view of a record: no token ids, no tenant, no content."""
    return {
        "id": record.id,
        "object": "context",
        "model": record.model,
        "display_name": record.display_name,
        "kind": record.kind,
        "create_time": _rfc3339(record.create_time),
        "update_time": _rfc3339(record.update_time),
        "expire_time": _rfc3339(record.expire_time),
        "usage": {"total_tokens": len(record.token_ids)},
        "state": record.state,
        "progress": {"stored_chunks": record.num_chunks_stored, "total_chunks": record.num_chunks},
        "error": record.error or None,
    }


def _service(request: Request) -> ContextService:
    return request.app.state.contexts


@router.post("")
async def create_context(body: ContextCreate, request: Request, tenant: str = Depends(tenant_of)) -> JSONResponse:
    check_model(request.app.state.engine, body.model)
    record = await _service(request).create(tenant, body)
    return JSONResponse(context_view(record), status_code=200 if record.state == "ACTIVE" else 202)


@router.get("")
async def list_contexts(request: Request, tenant: str = Depends(tenant_of)) -> dict[str, Any]:
    return {"object": "list", "data": [context_view(record) for record in _service(request).list(tenant)]}


@router.get("/{context_id}")
async def get_context(context_id: str, request: Request, tenant: str = Depends(tenant_of)) -> dict[str, Any]:
    return context_view(_service(request).get(tenant, context_id))


@router.patch("/{context_id}")
async def update_context(
    context_id: str, body: ContextUpdate, request: Request, tenant: str = Depends(tenant_of)
) -> dict[str, Any]:
    return context_view(_service(request).update(tenant, context_id, body))


@router.delete("/{context_id}")
async def delete_context(context_id: str, request: Request, tenant: str = Depends(tenant_of)) -> dict[str, Any]:
    await _service(request).delete(tenant, context_id)
    return {"id": context_id, "object": "context.deleted", "deleted": True}
