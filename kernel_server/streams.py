"""The streaming endpoints: ``/ws/generate`` (one generation, token by token), ``/ws/session``
(the notebook channel, SPEC 4) and ``PUT /session/{id}/upload`` (a session request's buffers)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from mymps_magic import wire

from .errors import BadRequest, NotFound, ServerError, as_server_error
from .outbox import Mailbox, TakenOver
from .routing import generation_job, left_over, next_piece, state_of
from .schemas import GenerateBody, describe_validation_error
from .sessions import Session

router = APIRouter()


async def _ws_error(ws: WebSocket, status: int, message: str) -> None:
    await ws.send_json(wire.error_message(message, status))
    await ws.close()


ONE_REQUEST = "send one request per connection; open a new one for the next generation"

CANCEL_WAIT_S = 2.0
"""How long a cancelled generation is given to stop (it checks at every token) before its
client is answered anyway; the job is off the queue by then, or going."""


def _cancelled_stats() -> dict[str, Any]:
    """The ``done`` figures of a generation cancelled while it was still queued (or that did not
    stop within :data:`CANCEL_WAIT_S`, whose figures are not known yet)."""
    return {"tokens_generated": 0, "time_s": 0.0, "tokens_per_s": 0.0, "stop_reason": "cancelled"}


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


@router.websocket("/ws/generate")
async def ws_generate(ws: WebSocket) -> None:
    """Stream one generation; a client that disconnects cancels it at the next token.

    One request per connection: any message the client sends during the generation cancels it,
    and the connection closes with ``wire.CLOSE_PROTOCOL_MISUSE`` and :data:`ONE_REQUEST` (a
    second request on the same socket has no id to tell its tokens from the first's). The
    exception is ``{"type": "cancel"}`` (``wire.cancel_message``): it is answered, once the job has
    stopped (at most :data:`CANCEL_WAIT_S` later), by the ``done`` frame (``stop_reason:
    "cancelled"``, the tokens so far; none for a job cancelled while still queued) and a normal
    close. Fields of the request this endpoint does not know are listed in the ``done`` frame's
    ``ignored``.
    """
    st = state_of(ws)
    await ws.accept()
    try:
        first = await ws.receive()
        if first["type"] == "websocket.disconnect":
            return
        if first.get("text") is None:
            await _ws_error(ws, 400, "the first frame must be a JSON text message "
                            "{model, prompt, max_new_tokens, ...}, not binary")
            return
        body = GenerateBody.model_validate_json(first["text"])
        params = body.request()
        st.registry.get(params.model, ("text",))
    except WebSocketDisconnect:
        return
    except ValidationError as exc:
        errors = exc.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            await _ws_error(ws, 400, "the first frame must be a JSON object {model, prompt, max_new_tokens, ...}")
        else:
            await _ws_error(ws, 422, describe_validation_error(list(errors)))  # type: ignore[arg-type]
        return
    except ServerError as exc:
        await _ws_error(ws, exc.status, exc.message)
        return

    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str] = asyncio.Queue()

    def on_text(text: str) -> None:
        loop.call_soon_threadsafe(pieces.put_nowait, text)

    job = st.jobs.submit(
        generation_job(st, params, on_text),
        "generate", model=params.model, session="ws",
    )
    st.lifetime.touch(params.model, params.keep_alive)
    done = asyncio.wrap_future(job)
    heard = asyncio.ensure_future(ws.receive())  # a goodbye, or a message it should not send
    try:
        while (text := await next_piece(pieces, done, heard)) is not None:
            await ws.send_json(wire.token_message(text))
        if heard.done() and not done.done():
            asked = _is_cancel(heard.result())
            st.jobs.abandon(job, "cancelled by its client" if asked else "cancelled: its client disconnected")
            if not asked:
                await asyncio.wait({done}, timeout=2)
                if heard.result()["type"] != "websocket.disconnect":
                    await ws.close(wire.CLOSE_PROTOCOL_MISUSE, ONE_REQUEST)
                return
            # The protocol answers a close frame at once, so only a cancel can wait for the
            # job: the done frame below ("cancelled") goes out once it is off /jobs.
            await asyncio.wait({done}, timeout=CANCEL_WAIT_S)
        for text in left_over(pieces):
            await ws.send_json(wire.token_message(text))
        try:
            stats = done.result() if done.done() and not done.cancelled() else _cancelled_stats()
        except BaseException as exc:
            err = as_server_error(exc)
            await _ws_error(ws, err.status, err.message)
            return
        await ws.send_json(wire.done_message(_with_ignored(stats, body.ignored())))
        await ws.close()
    except (WebSocketDisconnect, RuntimeError):  # the send failed: the client is gone
        st.jobs.abandon(job, "cancelled: its client disconnected")
    finally:
        heard.cancel()


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
