"""``POST /chat`` and ``/ws/chat``: a conversation continued through the model's chat template.

The answer is ``POST /generate``'s (the template's prompt generated as ``/generate`` would) plus
the reply as ``message`` and the prompt's ``prompt_tokens``; asked with ``stream: true`` or
``Accept: application/x-ndjson`` it comes as NDJSON lines, the messages of ``/ws/generate``
(``token``... then ``done`` or ``error``), and ``/ws/chat`` sends those same messages over a
WebSocket, cancel included.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Request, Response, WebSocket
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from mymps_magic import wire

from .errors import ServerError, Unprocessable
from .routing import state_of
from .schemas import GenerateBody, KeepAlive
from .streams import CANCELLED_STATS, first_request, stream
from .textjobs import Pieces, answer, chat_model, chat_prompt, submit

router = APIRouter()

_SAMPLING = GenerateBody.model_fields
ONE_REQUEST = "send one request per connection; open a new one for the next reply"


class MessageBody(BaseModel):
    """One message of ``wire.ChatRequest``'s conversation."""

    model_config = ConfigDict(extra="forbid")

    role: wire.Role
    content: str


class ChatBody(BaseModel):
    """``wire.ChatRequest`` and ``stream``. The sampling fields are ``/generate``'s, with its
    limits; one this body does not declare is read (or refused) by the wire's reader."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model: str = Field(min_length=1)
    messages: list[MessageBody] = Field(min_length=1, max_length=wire.MAX_MESSAGES)
    chat_template: str | None = Field(None, min_length=1, description="a Jinja chat template instead of the "
                                      "tokenizer's own (needed where the model has none)")
    stream: bool = Field(False, description="answer as NDJSON lines, as Accept: application/x-ndjson does")
    max_new_tokens: Annotated[int, _SAMPLING["max_new_tokens"]]
    temperature: Annotated[float | None, _SAMPLING["temperature"]]
    top_p: Annotated[float | None, _SAMPLING["top_p"]]
    top_k: Annotated[int | None, _SAMPLING["top_k"]]
    repetition_penalty: Annotated[float | None, _SAMPLING["repetition_penalty"]]
    seed: Annotated[int | None, _SAMPLING["seed"]]
    stop: Annotated[list[str], _SAMPLING["stop"]]
    keep_alive: KeepAlive = None

    def request(self) -> wire.ChatRequest:
        """The wire's request (``stream`` is how to answer, not part of it).

        Raises:
            Unprocessable: the wire's reader refused a field (one this body does not declare).
        """
        try:
            return wire.ChatRequest.from_json(self.model_dump(exclude={"stream"}))
        except wire.WireFormatError as exc:
            raise Unprocessable(str(exc)) from None


def reply(result: Mapping[str, Any]) -> dict[str, Any]:
    """``/chat``'s answer out of the generation's result: the reply as ``message``; a context
    limit's one-line ``message`` moves to ``note``."""
    answer = dict(result)
    note = answer.pop("message", None)
    if note is not None:
        answer["note"] = note
    answer["message"] = {"role": "assistant", "content": answer["text"]}
    return answer


@router.post("/chat")
async def chat(body: ChatBody, request: Request) -> Any:
    """Continue the conversation; the client going away cancels it at the next token."""
    st = state_of(request)
    asked = body.request()
    chat_model(st, asked.model, asked.chat_template)
    prompt = chat_prompt(asked.messages, asked.chat_template)
    if body.stream or wire.NDJSON in request.headers.get("accept", ""):
        return StreamingResponse(_lines(Pieces(st, asked.model, prompt, asked.generation)),
                                 media_type=wire.NDJSON)
    result = await answer(st, request, submit(st, asked.model, prompt, asked.generation, None))
    return Response(status_code=499) if result is None else reply(result)  # 499: nobody reads it


async def _lines(pieces: Pieces) -> AsyncIterator[bytes]:
    try:
        async for piece in pieces:
            yield wire.ndjson_line(wire.token_message(piece))
        try:
            result = pieces.result()
        except ServerError as err:
            yield wire.ndjson_line(wire.error_message(err.message, err.status))
            return
        yield wire.ndjson_line(wire.done_message(reply(result)))
    finally:
        pieces.abandon()


@router.websocket("/ws/chat")
async def ws_chat(ws: WebSocket) -> None:
    """Stream one reply, as ``/ws/generate`` streams a generation (``streams.stream``): the first
    message is the request (``wire.ChatRequest``), then ``token`` messages and ``done`` (with the
    reply as ``message``) or ``error``; ``{"type": "cancel"}`` stops it (answered by ``done``), a
    disconnect cancels it, any other message cancels it and closes the connection."""
    st = state_of(ws)

    def read(text: str) -> wire.ChatRequest:
        asked = ChatBody.model_validate_json(text).request()
        chat_model(st, asked.model, asked.chat_template)
        return asked

    asked = await first_request(ws, read, "{model, messages, ...}")
    if asked is None:
        return
    pieces = Pieces(st, asked.model, chat_prompt(asked.messages, asked.chat_template), asked.generation)
    await stream(ws, pieces, reply, CANCELLED_STATS, ONE_REQUEST)
