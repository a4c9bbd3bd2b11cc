"""The OpenAI-compatible endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST
/v1/completions``, so that any OpenAI client reaches the loaded models with the server's token as
its API key (``OpenAI(base_url=".../v1", api_key=token)``).

Each runs the generation ``/chat`` and ``/generate`` run (``textjobs.py``), so the token rate is
theirs; ``stream: true`` answers as server-sent events (``data: {chunk}`` lines, then ``data:
[DONE]``). Every error, a refused body included, is OpenAI's ``{"error": {"message", "type",
"code"}}``: this router's routes shape their own errors (:class:`OpenAIRoute`), and the token
guard shapes its 401 and 413 on these paths (``auth.py``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute

from mymps_magic import wire

from .errors import ServerError
from .openai_bodies import (
    OPENAI_PREFIX,
    OWNER,
    Answer,
    ChatCompletionBody,
    CompletionBody,
    error_body,
    error_code,
    finish_reason,
)
from .routing import state_of
from .schemas import describe_validation_error
from .serverstate import ServerState
from .textjobs import Pieces, Prompt, answer, chat_model, chat_prompt, submit

SSE = "text/event-stream"


class OpenAIRoute(APIRoute):
    """A route whose errors leave in OpenAI's shape, a refused body (400, as OpenAI answers it)
    included, where the app's handlers would answer ``{"error": "..."}``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def shaped(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return error_response(400, describe_validation_error(list(exc.errors())))
            except ServerError as exc:
                return error_response(exc.status, exc.message)

        return shaped


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse(error_body(message, status, error_code(status)), status_code=status)


router = APIRouter(prefix=OPENAI_PREFIX, route_class=OpenAIRoute, tags=["OpenAI-compatible"])


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    """The loaded text models, as OpenAI lists models."""
    described = state_of(request).registry.describe()
    return {"object": "list", "data": [{"id": m["name"], "object": "model", "created": int(m["loaded_at"]),
                                        "owned_by": OWNER} for m in described if m["kind"] == "text"]}


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionBody, request: Request) -> Any:
    """A chat completion through the model's chat template."""
    st = state_of(request)
    chat_model(st, body.model, body.chat_template)
    params = body.generation("", body.max_completion_tokens or body.max_tokens)
    return await _complete(st, request, body.model, chat_prompt(body.messages_read(), body.chat_template), params,
                           Answer(body.model, chat=True), body.stream, body.include_usage)


@router.post("/completions")
async def completions(body: CompletionBody, request: Request) -> Any:
    """A text completion of the prompt as written."""
    st = state_of(request)
    st.registry.get(body.model, ("text",))
    text = body.text()
    params = body.generation(text, body.max_tokens)
    return await _complete(st, request, body.model, lambda loaded: text, params, Answer(body.model, chat=False),
                           body.stream, body.include_usage)


async def _complete(st: ServerState, request: Request, model: str, prompt: Prompt, params: wire.GenerateRequest,
                    shape: Answer, stream: bool, include_usage: bool) -> Any:
    """Answer the completion whole, or as server-sent events."""
    if stream:
        return StreamingResponse(_events(Pieces(st, model, prompt, params), shape, include_usage), media_type=SSE)
    result = await answer(st, request, submit(st, model, prompt, params, None))
    return Response(status_code=499) if result is None else shape.whole(result)  # 499: nobody reads it


def _event(data: Any) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _events(pieces: Pieces, shape: Answer, include_usage: bool) -> AsyncIterator[bytes]:
    try:
        if shape.chat:
            yield _event(shape.chunk(None))
        async for piece in pieces:
            yield _event(shape.chunk(piece))
        try:
            result = pieces.result()
        except ServerError as err:
            yield _event(error_body(err.message, err.status, error_code(err.status)))
            return
        yield _event(shape.chunk(None, finish_reason(result)))
        if include_usage:
            yield _event(shape.usage_chunk(result))
        yield b"data: [DONE]\n\n"
    finally:
        pieces.abandon()
