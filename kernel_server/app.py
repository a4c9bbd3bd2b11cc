"""``create_app(settings)``: the FastAPI app, its lifespan and its error answers.

The lifespan opens the device, the model registry and the job queue, and closes them in reverse
order. Every error leaves as JSON ``{"error": "..."}`` with a fitting status, never a stack dump.
"""

from __future__ import annotations

import concurrent.futures
import gc
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mymps_magic import wire
from mymps_magic.wire import LoadRequest

from .auth import GuardMiddleware, TokenKeeper
from .chat import router as chat_router
from .device import Device, select_device
from .errors import ServerError, as_server_error
from .jobs import Job, JobQueue
from .openai_api import router as openai_router
from .registry import Registry
from .routes import router
from .schemas import describe_validation_error
from .serverstate import ServerState, server_version
from .sessions import SessionManager
from .settings import Settings
from .state import ModelState

log = logging.getLogger("kernel_server")


def startup_requests(settings: Settings, restored: list[LoadRequest]) -> list[LoadRequest]:
    """``--restore``'s models, then ``--preload``'s, each name once."""
    unique: dict[str, LoadRequest] = {}
    for request in list(restored) + [LoadRequest(n, k, d) for n, k, d in settings.preload]:
        unique.setdefault(request.name, request)
    return list(unique.values())


def _load_at_start(registry: Registry, jobs: JobQueue, requests: list[LoadRequest]) -> None:
    """Queue the start-up loads; the server answers meanwhile, and a failure is only logged."""
    for request in requests:
        def work(job: Job, request: LoadRequest = request) -> None:
            def progress(stage: str, fraction: float, message: str) -> None:
                job.progress = fraction

            registry.load(request, progress, job.check_cancelled)  # the registry logs the load

        def report(done: concurrent.futures.Future[None], request: LoadRequest = request) -> None:
            if not done.cancelled() and (exc := done.exception()) is not None:
                log.warning("could not load %s at start: %s", request.name, as_server_error(exc).message)

        jobs.submit(work, "load", model=request.name).add_done_callback(report)


def make_job_queue(
    device: Device, *, own_thread: bool, on_running: Callable[[Job | None], None] | None = None
) -> JobQueue:
    """The device queue; after a failed job it gives the device's cached memory back.
    ``on_running`` hears each job start (the job) and end (``None``): the run marker's hook."""

    def after_failure(exc: BaseException) -> None:
        gc.collect()
        device.free_memory()

    return JobQueue(on_failure=after_failure, own_thread=own_thread, on_running=on_running)


def create_app(
    settings: Settings, *, token: str | TokenKeeper, device: Device | None = None, jobs: JobQueue | None = None
) -> FastAPI:
    """Build the app.

    Args:
        settings: the server's settings.
        token: the token every request but ``GET /health`` must carry: fixed, or the keeper of
            a token file that ``mymps token rotate`` may change while the server runs.
        device: defaults to the one ``settings.device`` selects.
        jobs: a queue whose worker the caller runs (``python -m kernel_server`` runs it on the
            main thread, so interrupts break sleeps); by default one with its own thread.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        dev = device or select_device(settings.device)
        state = ModelState(settings.home / "state.json")
        to_restore = state.read() if settings.restore else []
        registry = Registry(dev, on_change=state.write)

        queue = jobs or make_job_queue(dev, own_thread=True)
        sessions = SessionManager(dev, registry, queue, settings.session_idle, settings.session_buffer)
        app.state.mymps = ServerState(settings, dev, registry, queue, sessions)
        _load_at_start(registry, queue, startup_requests(settings, to_restore))
        try:
            yield
        finally:
            app.state.mymps.lifetime.close()  # no expiry unloads queued while the queue closes
            sessions.close()
            queue.close()

    app = FastAPI(
        title="mymps kernel_server",
        version=server_version(),
        description="Keeps PyTorch / HuggingFace models in device memory and runs work on them.",
        lifespan=lifespan,
    )
    app.include_router(router)
    app.include_router(chat_router)
    app.include_router(openai_router)

    @app.exception_handler(ServerError)
    async def on_server_error(request: Request, exc: ServerError) -> JSONResponse:
        return JSONResponse(wire.error_body(exc.message, code=exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(err.get("type") == "json_invalid" or tuple(err.get("loc", ())) == ("body",) for err in errors):
            return JSONResponse(wire.error_body("the body must be a JSON object (send it with "
                                                "Content-Type: application/json)"), status_code=400)
        return JSONResponse(wire.error_body(describe_validation_error(errors)), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}; GET /openapi.json lists the endpoints"
        return JSONResponse(wire.error_body(message), status_code=exc.status_code, headers=exc.headers)

    token_source = "MYMPS_TOKEN" if settings.token else str(settings.resolved_token_file)
    keeper = token if isinstance(token, TokenKeeper) else TokenKeeper(token)
    app.add_middleware(GuardMiddleware, token=keeper, max_body=settings.max_body, token_source=token_source)
    app.add_middleware(ErrorLog)  # outermost: it also sees the guard's 401s and 413s
    return app


class ErrorLog:
    """ASGI middleware: one log line for every request that ends in an error.

    ``GET /models/x/info -> 404: no model named 'x'; ...``: method, path (never the query
    string, where a careless client might put a token), status and the answer's one-line
    ``error``. A WebSocket refused or closed with an error code gets ``WS /path closed 1009: reason``.
    """

    _MAX_BODY_SEEN = 4096  # error answers are small JSON; enough for their message

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        status = 0
        body = b""

        async def watching_send(message: dict[str, Any]) -> None:
            nonlocal status, body
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body" and status >= 400:
                body = (body + message.get("body", b""))[:self._MAX_BODY_SEEN]
                if not message.get("more_body", False):
                    _log_request_error(f"{scope['method']} {scope['path']}", status, _reason(body))
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except Exception as exc:  # the 500 that Starlette's outermost layer makes of it
            if not status:
                _log_request_error(f"{scope['method']} {scope['path']}", 500, f"{type(exc).__name__}: {exc}")
            raise

    async def _websocket(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def watching_send(message: dict[str, Any]) -> None:
            code = message.get("code", 1000)
            if message["type"] == "websocket.close" and code not in _NORMAL_CLOSE_CODES:
                log.info("WS %s closed %s: %s", scope["path"], code, message.get("reason") or "no reason given")
            await send(message)

        await self.app(scope, receive, watching_send)


_NORMAL_CLOSE_CODES = frozenset({1000, 1001, 1012})  # done, going away, the server restarting


def _reason(body: bytes) -> str:
    try:
        text = str(json.loads(body).get("error", ""))
    except (ValueError, AttributeError):
        text = body.decode(errors="replace")
    lines = text.strip().splitlines()
    return lines[0] if lines else "(no message)"


def _log_request_error(request: str, status: int, reason: str) -> None:
    log.log(logging.ERROR if status >= 500 else logging.INFO, "%s -> %s: %s", request, status, reason)
