"""The HTTP and WebSocket endpoints: thin over the registry, the job queue and the workers.

Metadata endpoints read shared state directly and never queue; everything that touches the
device is a job, awaited without blocking the event loop.
"""

from __future__ import annotations

import asyncio
import json
import platform
import time
from typing import Any, AsyncIterator, Callable

import psutil
import torch
from fastapi import APIRouter, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect
from pydantic import ValidationError

from mymps_magic import wire

from . import generation, inference
from .errors import BadRequest, Cancelled, NotFound, ServerError, Unprocessable, as_server_error
from .jobs import SHUTDOWN_REASON, Job
from .registry import LoadRequest
from .outbox import Mailbox, TakenOver
from .sessions import Session
from .schemas import GenerateBody, ImageBody, LoadBody, describe_validation_error
from .serverstate import ServerState, server_version

router = APIRouter()


def _state(request: Request | WebSocket) -> ServerState:
    return request.app.state.mymps  # type: ignore[no-any-return]


async def _run(st: ServerState, fn: Callable[[Job], Any], kind: str, model: str | None = None) -> Any:
    """Queue ``fn`` as a job and await it; its failure becomes the error the client sees."""
    try:
        return await st.jobs.run(fn, kind, model=model)
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        raise as_server_error(exc) from exc


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """Liveness and identity; the one endpoint that needs no token."""
    st = _state(request)
    return {
        "status": "ok",
        "version": server_version(),
        "protocol": wire.PROTOCOL_VERSION,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": st.device.kind,
        "device_name": st.device.name,
        "models": st.registry.names(),
        "uptime_s": round(time.time() - st.started_at, 1),
    }


@router.get("/stats")
async def stats(request: Request) -> dict[str, Any]:
    st = _state(request)
    vm = psutil.virtual_memory()
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "ram": {"used": vm.total - vm.available, "total": vm.total},
        "device": st.device.describe(),
        "jobs": st.jobs.counts(),
    }


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"models": _state(request).registry.describe()}


def _loaded_answer(st: ServerState, name: str, started: float, already: bool) -> dict[str, Any]:
    model = st.registry.get(name)
    answer = {
        "status": "ok",
        "name": name,
        "device": st.device.kind,
        "kind": model.kind,
        "dtype": model.describe()["dtype"],
        "load_time_s": round(time.perf_counter() - started, 3),
        "already_loaded": already,
    }
    if already:
        answer["message"] = f"{name} was already loaded; nothing to do"
    return answer


@router.post("/models/load")
async def load_model(body: LoadBody, request: Request) -> Any:
    """Load a model; with ``Accept: application/x-ndjson`` progress streams as NDJSON lines."""
    st = _state(request)
    started = time.perf_counter()
    ndjson = wire.NDJSON in request.headers.get("accept", "")
    load_request = LoadRequest(**{**body.model_dump(), "kind": body.kind or "detect"})
    if st.registry.already_loaded(load_request):  # or a 409: loaded as another kind or dtype
        answer = _loaded_answer(st, body.name, started, True)
        return Response(wire.ndjson_line(answer), media_type=wire.NDJSON) if ndjson else answer
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def work(job: Job) -> bool:
        if st.registry.already_loaded(load_request):  # loaded by a request queued before this one
            return True

        def progress(stage: str, fraction: float, message: str) -> None:
            job.progress = fraction
            loop.call_soon_threadsafe(events.put_nowait, wire.progress_event(stage, fraction, message))

        st.registry.load(load_request, progress, job.check_cancelled)
        return False

    if not ndjson:
        already = await _run(st, work, "load", body.name)
        return _loaded_answer(st, body.name, started, already)

    job = st.jobs.submit(work, "load", model=body.name)

    async def stream() -> AsyncIterator[bytes]:
        done = asyncio.wrap_future(job)
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield wire.ndjson_line(getter.result())
                    continue
                getter.cancel()
                while not events.empty():
                    yield wire.ndjson_line(events.get_nowait())
                try:
                    yield wire.ndjson_line(_loaded_answer(st, body.name, started, done.result()))
                except BaseException as exc:
                    err = as_server_error(exc)
                    yield wire.ndjson_line(wire.error_body(err.message, err.status, err.code))
                return
        finally:
            st.jobs.abandon(job, "cancelled: its client went away")

    return StreamingResponse(stream(), media_type=wire.NDJSON)


@router.delete("/models/{name:path}")
async def unload_model(name: str, request: Request) -> dict[str, Any]:
    st = _state(request)
    st.registry.get(name)  # a fast 404 before queueing
    freed = await _run(st, lambda job: st.registry.unload(name), "unload", name)
    return {"status": "ok", "name": name, "freed_bytes": freed}


@router.get("/models/{name:path}/info")
async def model_info(name: str, request: Request) -> dict[str, Any]:
    return _state(request).registry.get(name).info()


@router.get("/jobs")
async def list_jobs(request: Request) -> dict[str, Any]:
    return {"jobs": _state(request).jobs.list()}


@router.delete("/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request) -> dict[str, Any]:
    job = _state(request).jobs.cancel(job_id, "cancelled by DELETE /jobs")
    return {"status": "ok", "id": job.id, "cancelled": True}


@router.post("/infer", response_class=Response, responses={200: {"content": {wire.MSGPACK: {}}}})
async def infer(request: Request) -> Response:
    """Forward pass: a msgpack tensor map in, the outputs as a msgpack tensor map out."""
    st = _state(request)
    name = request.headers.get(wire.HEADER_MODEL)
    if not name:
        raise Unprocessable(f"name the model in the {wire.HEADER_MODEL!r} header")
    st.registry.get(name)
    try:
        inputs = wire.unpack_tensors(await request.body())
    except wire.WireFormatError as exc:
        raise BadRequest(str(exc)) from None
    outputs = await _run(st, lambda job: inference.infer(st.registry.get(name), inputs), "infer", name)
    return Response(wire.pack_tensors(outputs), media_type=wire.MSGPACK)


def _generation_job(st: ServerState, body: GenerateBody, on_text: Callable[[str], None] | None) -> Callable[[Job], Any]:
    params = body.request()

    def work(job: Job) -> dict[str, Any]:
        loaded = st.registry.get(body.model, ("text",))

        def on_progress(fraction: float) -> None:
            job.progress = fraction

        result = generation.generate(loaded, params, lambda: job.cancelled_flag, on_text, on_progress)
        if job.cancel_reason == SHUTDOWN_REASON:  # not the user's choice: say so, not a partial text
            raise Cancelled(f"the generation was {SHUTDOWN_REASON}; start it again when the server is back")
        return result

    return work


@router.post("/generate")
async def generate(body: GenerateBody, request: Request) -> dict[str, Any]:
    """Generate; a client that goes away before the answer cancels it at the next token, as on
    ``/ws/generate``, so the device is free for the next caller within a moment."""
    st = _state(request)
    st.registry.get(body.model, ("text",))
    job = st.jobs.submit(_generation_job(st, body, None), "generate", model=body.model)
    done = asyncio.wrap_future(job)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not done.done():
        st.jobs.abandon(job, "cancelled: its client went away")
        await asyncio.wait({done}, timeout=2)  # the worker stops at the next token
        return Response(status_code=499)  # type: ignore[return-value]  # nobody reads it
    try:
        return done.result()  # type: ignore[no-any-return]
    except asyncio.CancelledError:
        raise Cancelled(f"job {job.id} was {job.cancel_reason}") from None
    except BaseException as exc:
        raise as_server_error(exc) from exc


async def _disconnected(request: Request) -> None:
    """Return once the HTTP client has gone away (its body was read already, so the next
    message the server gets for this request is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post("/image")
async def image(body: ImageBody, request: Request) -> dict[str, Any]:
    st = _state(request)
    st.registry.get(body.model, ("diffusion",))

    def work(job: Job) -> dict[str, Any]:
        def on_progress(fraction: float) -> None:
            job.progress = fraction

        return inference.image(
            st.registry.get(body.model, ("diffusion",)), body.prompt, body.steps, seed=body.seed,
            guidance_scale=body.guidance_scale, width=body.width, height=body.height,
            num_images=body.num_images, check_cancelled=job.check_cancelled, on_progress=on_progress,
        )

    return await _run(st, work, "image", body.model)  # type: ignore[no-any-return]


async def _ws_error(ws: WebSocket, status: int, message: str) -> None:
    await ws.send_json({"type": wire.MSG_ERROR, **wire.error_body(message, status)})
    await ws.close()


ONE_REQUEST = "send one request per connection; open a new one for the next generation"

CANCEL_WAIT_S = 2.0
"""How long a cancelled generation is given to stop (it checks at every token) before its
client is answered anyway; the job is off the queue by then, or going."""


def _cancelled_stats() -> dict[str, Any]:
    """The ``done`` figures of a generation cancelled while it was still queued (or that did not
    stop within :data:`CANCEL_WAIT_S`, whose figures are not known yet)."""
    return {"tokens_generated": 0, "time_s": 0.0, "tokens_per_s": 0.0, "stop_reason": "cancelled"}


def _is_cancel(message: dict[str, Any]) -> bool:
    """Whether a message heard mid-generation is the client's ``{"type": "cancel"}``."""
    try:
        frame = json.loads(message.get("text") or "null")
    except ValueError:
        return False
    return isinstance(frame, dict) and frame.get("type") == wire.MSG_CANCEL


@router.websocket("/ws/generate")
async def ws_generate(ws: WebSocket) -> None:
    """Stream one generation; a client that disconnects cancels it at the next token.

    One request per connection: any message the client sends during the generation cancels it,
    and the connection closes with ``wire.CLOSE_PROTOCOL_MISUSE`` and :data:`ONE_REQUEST` (a
    second request on the same socket has no id to tell its tokens from the first's). The
    exception is ``{"type": "cancel"}`` (``wire.MSG_CANCEL``): it is answered, once the job has
    stopped (at most :data:`CANCEL_WAIT_S` later), by the ``done`` frame (``stop_reason:
    "cancelled"``, the tokens so far; none for a job cancelled while still queued) and a normal
    close.
    """
    st = _state(ws)
    await ws.accept()
    try:
        first = await ws.receive()
        if first["type"] == "websocket.disconnect":
            return
        if first.get("text") is None:
            await _ws_error(ws, 400, "the first frame must be a JSON text message {model, prompt, max_new_tokens, ...}, "
                            "not binary")
            return
        body = GenerateBody.model_validate_json(first["text"])
        st.registry.get(body.model, ("text",))
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
    job = st.jobs.submit(
        _generation_job(st, body, lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text)),
        "generate", model=body.model, session="ws",
    )
    done = asyncio.wrap_future(job)
    heard = asyncio.ensure_future(ws.receive())  # a goodbye, or a message it should not send
    try:
        while True:
            getter = asyncio.ensure_future(pieces.get())
            await asyncio.wait({getter, done, heard}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                await ws.send_json({"type": wire.MSG_TOKEN, "text": getter.result()})
                continue
            getter.cancel()
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
            while not pieces.empty():
                await ws.send_json({"type": wire.MSG_TOKEN, "text": pieces.get_nowait()})
            try:
                stats = done.result() if done.done() and not done.cancelled() else _cancelled_stats()
            except BaseException as exc:
                err = as_server_error(exc)
                await _ws_error(ws, err.status, err.message)
                return
            await ws.send_json({"type": wire.MSG_DONE, **{k: v for k, v in stats.items() if k != "text"}})
            await ws.close()
            return
    except (WebSocketDisconnect, RuntimeError):  # the send failed: the client is gone
        st.jobs.abandon(job, "cancelled: its client disconnected")
    finally:
        heard.cancel()


@router.put("/session/{session_id}/upload")
async def session_upload(session_id: str, request: Request) -> Response:
    """The buffers of a large session request as a plain HTTP body: read straight into the
    buffers they fill, where WebSocket messages are masked and copied several times on the
    way. The request itself follows on ``/ws/session`` and names the upload."""
    st = _state(request)
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
    st = _state(ws)
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
