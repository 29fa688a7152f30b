"""OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, plus ``/health`` and
``/metrics``. Every response carries ``usage.prompt_tokens_details.cached_tokens`` (streams: with
``stream_options.include_usage``)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.auth import tenant_of
from server.api.engine_host import Engine, EngineNotReady, GenerationDelta
from server.api.generation import (
    Run,
    chat_ids,
    check_model,
    completion_ids,
    new_engine_request,
    sampling_for,
    sse_stream,
)
from server.api.schemas import ChatCompletionRequest, CompletionRequest

router = APIRouter()


def _engine(request: Request) -> Engine:
    return request.app.state.engine


@router.get("/health")
async def health(request: Request) -> dict[str, str]:
    engine = _engine(request)
    if not engine.is_ready:
        raise EngineNotReady(getattr(engine, "start_error", None) or "the engine is starting")
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)


def _model_card(engine: Engine, created: int) -> dict[str, Any]:
    return {"id": engine.model_name, "object": "model", "created": created, "owned_by": "cachegen",
            "root": str(engine.model_dir)}  # fmt: skip


@router.get("/v1/models")
async def list_models(request: Request, tenant: str = Depends(tenant_of)) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(_engine(request), request.app.state.created)]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request, tenant: str = Depends(tenant_of)) -> dict[str, Any]:
    engine = _engine(request)
    check_model(engine, model)
    return _model_card(engine, request.app.state.created)


async def _start(request: Request, body: CompletionRequest | ChatCompletionRequest, tenant: str,
                 endpoint: str) -> Run:  # fmt: skip
    engine, state = _engine(request), request.app.state
    check_model(engine, body.model)
    context = state.contexts.get(tenant, body.cached_context) if body.cached_context else None
    if isinstance(body, CompletionRequest):
        ids, budget = completion_ids(engine, body, context), body.max_tokens
    else:
        ids, budget = chat_ids(engine, body, context), body.token_budget()
    sampling = sampling_for(body, budget, len(ids), state.settings.server)
    request_id = request.state.request_id
    engine_request = new_engine_request(request_id, ids, tenant, sampling, body.cachegen.transfer_params())
    return await Run.start(engine, engine_request, endpoint, request_id)


def _head(kind: str, request_id: str, model: str) -> dict[str, Any]:
    return {"id": f"{kind}-{request_id}", "created": int(time.time()), "model": model}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, tenant: str = Depends(tenant_of)) -> Response:
    run = await _start(request, body, tenant, "completions")
    head = {**_head("cmpl", run.request_id, body.model), "object": "text_completion"}
    if body.stream:

        def chunk_of(delta: GenerationDelta | None, is_first: bool) -> dict[str, Any]:
            choice = {"index": 0, "text": delta.text if delta else "", "logprobs": None,
                      "finish_reason": delta.finish_reason if delta else None}  # fmt: skip
            return {**head, "choices": [choice], "usage": None}

        return _streaming(sse_stream(run, chunk_of, body.include_usage))
    done = await run.collect()
    choice = {"index": 0, "text": done.text, "logprobs": None, "finish_reason": done.finish_reason}
    return JSONResponse({**head, "choices": [choice], "usage": done.usage()})


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           tenant: str = Depends(tenant_of)) -> Response:  # fmt: skip
    run = await _start(request, body, tenant, "chat")
    head = _head("chatcmpl", run.request_id, body.model)
    if body.stream:

        def chunk_of(delta: GenerationDelta | None, is_first: bool) -> dict[str, Any]:
            text = delta.text if delta else ""
            message = {"role": "assistant", "content": text} if is_first else {"content": text}
            choice = {"index": 0, "delta": message if delta else {}, "logprobs": None,
                      "finish_reason": delta.finish_reason if delta else None}  # fmt: skip
            return {**head, "object": "chat.completion.chunk", "choices": [choice], "usage": None}

        return _streaming(sse_stream(run, chunk_of, body.include_usage))
    done = await run.collect()
    choice = {"index": 0, "message": {"role": "assistant", "content": done.text}, "logprobs": None,
              "finish_reason": done.finish_reason}  # fmt: skip
    return JSONResponse({**head, "object": "chat.completion", "choices": [choice], "usage": done.usage()})


def _streaming(events: Any) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)
