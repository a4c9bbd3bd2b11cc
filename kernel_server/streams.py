"""The streaming endpoints: ``/ws/generate`` (one generation, token by token), ``/ws/session``
(the notebook channel, SPEC 4) and ``PUT /session/{id}/upload`` (a session request's buffers)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from mymps_magic import wire

from .errors import BadRequest, NotFound, ServerError
from .outbox import Mailbox, TakenOver
from .routing import generation_job, state_of
from .schemas import GenerateBody, describe_validation_error
from .sessions import Session
from .textjobs import JobPieces

router = APIRouter()


async def ws_error(ws: WebSocket, status: int, message: str) -> None:
    """Answer a WebSocket request with an ``error`` message and close the connection."""
    await ws.send_json(wire.error_message(message, status))
    await ws.close()


ONE_REQUEST = "send one request per connection; open a new one for the next generation"

CANCEL_WAIT_S = 2.0
"""How long a cancelled generation is given to stop (it checks at every token) before its
client is answered anyway; the job is off the queue by then, or going."""

CANCELLED_STATS: dict[str, Any] = {"tokens_generated": 0, "time_s": 0.0, "tokens_per_s": 0.0,
                                   "stop_reason": "cancelled"}
"""The ``done`` figures of a generation cancelled while it was still queued (or that did not
stop within :data:`CANCEL_WAIT_S`, whose figures are not known yet)."""

T = TypeVar("T")


def _with_ignored(stats: dict[str, Any], ignored: list[str]) -> dict[str, Any]:
    """The ``done`` figures, with the request's unknown fields (``ignored``) where it sent any: in
    the last frame, which every client of the original reads, and not in an extra first frame
    that a client written for the original's token frames could take for text."""
    return {**stats, "ignored": ignored} if ignored else stats


def _is_cancel(message: Mapping[str, Any]) -> bool:
    """Whether a message heard mid-generation is the client's ``{"type": "cancel"}``."""
    text = message.get("text")
    try:
        return text is not None and isinstance(wire.read_generate_message(text), wire.Cancel)
    except wire.WireFormatError:
        return False


async def first_request(ws: WebSocket, read: Callable[[str], T], shape: str) -> T | None:
    """Accept the connection and read its first message, the request, with ``read`` (which
    validates it and checks its model). A bad one is answered by an ``error`` message (400 for
    what is not a JSON object ``shape``, 422 for a field out of bounds, a ServerError's own status)
    and the connection closed; None then, as when the client left first."""
    await ws.accept()
    try:
        first = await ws.receive()
        if first["type"] == "websocket.disconnect":
            return None
        if first.get("text") is None:
            await ws_error(ws, 400, f"the first message must be a JSON text message {shape}, not binary")
            return None
        return read(first["text"])
    except WebSocketDisconnect:
        return None
    except ValidationError as exc:
        errors = exc.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            await ws_error(ws, 400, f"the first message must be a JSON object {shape}")
        else:
            await ws_error(ws, 422, describe_validation_error(list(errors)))  # type: ignore[arg-type]
        return None
    except ServerError as exc:
        await ws_error(ws, exc.status, exc.message)
        return None


async def stream(ws: WebSocket, pieces: JobPieces, finish: Callable[[dict[str, Any]], dict[str, Any]],
                 cancelled: dict[str, Any], one_request: str) -> None:
    """Send a running generation's pieces as ``token`` messages, then ``done`` with ``finish`` of
    its result (``cancelled`` where it was cancelled before it ran, or has not stopped yet) or
    ``error``, and close.

    One request per connection: any message the client sends during the generation cancels it,
    and the connection closes with ``wire.CLOSE_PROTOCOL_MISUSE`` and ``one_request`` (a second
    request on the same socket has no id to tell its tokens from the first's). The exception is
    ``{"type": "cancel"}`` (``wire.cancel_message``): it is answered, once the job has stopped (at
    most :data:`CANCEL_WAIT_S` later), by the ``done`` message (``stop_reason: "cancelled"``, the
    tokens so far; none for a job cancelled while still queued) and a normal close. A client that
    disconnects cancels the job at its next token.
    """
    heard = asyncio.ensure_future(ws.receive())  # a goodbye, a cancel, or a message it should not send
    try:
        async for piece in pieces.until(heard):
            await ws.send_json(wire.token_message(piece))
        if heard.done() and not pieces.done.done():
            if not _is_cancel(heard.result()):
                pieces.abandon()
                await asyncio.wait({pieces.done}, timeout=CANCEL_WAIT_S)
                if heard.result()["type"] != "websocket.disconnect":
                    await ws.close(wire.CLOSE_PROTOCOL_MISUSE, one_request)
                return
            # The protocol answers a close frame at once, so only a cancel can wait for the
            # job: the done message below ("cancelled") goes out once it is off /jobs.
            pieces.abandon("cancelled by its client")
            await asyncio.wait({pieces.done}, timeout=CANCEL_WAIT_S)
        for piece in pieces.left():
            await ws.send_json(wire.token_message(piece))
        if not pieces.done.done() or pieces.done.cancelled():  # still stopping, or cancelled while queued
            await ws.send_json(wire.done_message(cancelled))
        else:
            try:
                result = pieces.result()
            except ServerError as err:
                await ws_error(ws, err.status, err.message)
                return
            await ws.send_json(wire.done_message(finish(result)))
        await ws.close()
    except (WebSocketDisconnect, RuntimeError):  # the send failed: the client is gone
        pieces.abandon()
    finally:
        heard.cancel()


@router.websocket("/ws/generate")
async def ws_generate(ws: WebSocket) -> None:
    """Stream one generation as :func:`stream` says. Fields of the request this endpoint does not
    know are listed in the ``done`` message's ``ignored``."""
    st = state_of(ws)

    def read(text: str) -> tuple[GenerateBody, wire.GenerateRequest]:
        body = GenerateBody.model_validate_json(text)
        params = body.request()
        st.registry.get(params.model, ("text",))
        return body, params

    asked = await first_request(ws, read, "{model, prompt, max_new_tokens, ...}")
    if asked is None:
        return
    body, params = asked
    pieces = JobPieces(st, lambda on_text: st.jobs.submit(generation_job(st, params, on_text), "generate",
                                                          model=params.model, session="ws"))
    st.lifetime.touch(params.model, params.keep_alive)
    ignored = body.ignored()
    await stream(ws, pieces, lambda result: _with_ignored(result, ignored),
                 _with_ignored(CANCELLED_STATS, ignored), ONE_REQUEST)


@router.put("/session/{session_id}/upload")
async def session_upload(session_id: str, request: Request) -> Response:
    """The buffers of a large session request as a plain HTTP body: read straight into the
    buffers they fill, where WebSocket messages are masked and copied several times on the
    way. The request itself follows on ``/ws/session`` and names the upload."""
    st = state_of(request)
    session = st.sessions.sessions.get(session_id)
    if session is None:
        raise NotFound(f"no session {session_id!r} on this server (it restarted, or the session idled out)")
    decoder = wire.FrameDecoder(max_size=st.settings.max_body)
    frame = None
    try:
        async for chunk in request.stream():
            if chunk:
                frame = decoder.feed_stream(chunk)
    except wire.WireFormatError as exc:
        raise BadRequest(f"bad upload: {exc}") from None
    except ClientDisconnect:  # nobody is left to answer; nothing was kept
        return Response(status_code=400)
    if frame is None:
        raise BadRequest("the upload ended before all of its buffers arrived")
    return JSONResponse({"upload": session.add_upload(frame.buffers)})


TAKEN_OVER_CLOSE_S = 10.0
"""How long the close frame of a taken-over socket may wait behind output its client has not
read yet; past it the socket is dropped (its client is not reading anyway)."""


async def _next_frame(ws: WebSocket, decoder: wire.FrameDecoder) -> wire.Frame:
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        data = message.get("bytes")
        if data is None:
            raise wire.WireFormatError("session frames are binary messages")
        frame = decoder.feed(data)
        if frame is not None:
            return frame


async def _send_frames(ws: WebSocket, live: Mailbox) -> None:
    """Send what the session keeps for this socket, a bounded batch per step, until the client
    goes or a newer connection takes the session over (`ws_session` then closes the socket)."""
    try:
        while True:
            await _send_batch(ws, await live.take())
            await asyncio.sleep(0)  # a send into a free socket does not yield: other clients' turn
    except (TakenOver, WebSocketDisconnect, RuntimeError):  # taken over, or the client is gone
        pass


async def _send_batch(ws: WebSocket, batch: list[wire.Frame]) -> None:
    """A function of its own so that nothing of the batch outlives it: a loop variable would
    hold the last frame sent (a result of gigabytes, maybe) while the sender waits for the next."""
    for frame in batch:
        for message in wire.encode_frame(frame):
            await ws.send_bytes(message)  # type: ignore[arg-type]  # uvicorn takes a memoryview: no copy


async def _receive_requests(ws: WebSocket, decoder: wire.FrameDecoder, session: Session, live: Mailbox) -> None:
    """Hand the socket's frames to the session until it closes (or is taken over)."""
    try:
        while True:
            frame = await _next_frame(ws, decoder)
            if live.taken_over:  # what the old socket still had on its way is not the session's
                return
            session.receive(frame)
    except wire.WireFormatError as exc:
        await ws.close(_close_code(exc), str(exc)[:120])
    except (WebSocketDisconnect, RuntimeError):
        pass


async def _hello(ws: WebSocket, decoder: wire.FrameDecoder) -> wire.Hello:
    return wire.read_hello(await _next_frame(ws, decoder))


@router.websocket("/ws/session")
async def ws_session(ws: WebSocket) -> None:
    """The notebook channel (SPEC 4): requests with ids in, output and results out."""
    st = state_of(ws)
    await ws.accept()
    decoder = wire.FrameDecoder(max_size=st.settings.max_body)
    try:
        hello = await asyncio.wait_for(_hello(ws, decoder), wire.HELLO_TIMEOUT_S)
    except asyncio.TimeoutError:
        reason = f"no complete hello within {wire.HELLO_TIMEOUT_S:g} s; connect again"
        await ws.close(wire.CLOSE_PROTOCOL_MISUSE, reason)
        return
    except wire.WireFormatError as exc:
        await ws.close(_close_code(exc), str(exc)[:120])
        return
    except WebSocketDisconnect:
        return
    session, resumed = st.sessions.open(hello.session)
    # Attached before the welcome is built: its last_request then counts nothing an older
    # socket of this session could still add (see sessions._bad_request_id).
    live = session.attach(hello.last_seq if resumed else 0)
    try:
        for message in wire.encode_frame(st.sessions.welcome(session, resumed, hello)):
            await ws.send_bytes(bytes(message))
        tasks = {asyncio.ensure_future(_send_frames(ws, live)),
                 asyncio.ensure_future(_receive_requests(ws, decoder, session, live)),
                 asyncio.ensure_future(live.until_taken_over())}
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
        if live.taken_over:
            # Always a 4001 with its reason, also when the sender was waiting for a slow reader:
            # a socket that just dropped would look like a lost link, and its client would
            # reconnect and take the session back. The close goes out behind what the client
            # has not read yet (the send was cancelled before it wrote anything).
            await asyncio.wait_for(ws.close(wire.CLOSE_TAKEN_OVER, wire.TAKEN_OVER_REASON), TAKEN_OVER_CLOSE_S)
    except (WebSocketDisconnect, RuntimeError, asyncio.TimeoutError):
        pass
    finally:
        session.detach(live)


def _close_code(exc: wire.WireFormatError) -> int:
    return 1009 if isinstance(exc, wire.FrameTooLarge) else 1003  # message too big / unsupported data
