"""``create_app(settings)``: the FastAPI app, its lifespan and its error answers.

The lifespan opens the device, the model registry and the job queue, and closes them in reverse
order. Every error leaves as JSON ``{"error": "..."}`` with a fitting status, never a stack dump.
"""

from __future__ import annotations

import gc
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import metadata
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mymps_magic import wire

from .auth import GuardMiddleware
from .device import Device, select_device
from .errors import ServerError
from .jobs import JobQueue
from .registry import Registry
from .schemas import describe_validation_error
from .settings import Settings

log = logging.getLogger("kernel_server")


def server_version() -> str:
    try:
        return metadata.version("mymps")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass
class ServerState:
    """What the endpoints share; lives on ``app.state.mymps`` for the app's lifetime."""

    settings: Settings
    device: Device
    registry: Registry
    jobs: JobQueue
    started_at: float = field(default_factory=time.time)


def create_app(settings: Settings, *, token: str, device: Device | None = None) -> FastAPI:
    """Build the app. ``device`` defaults to the one ``settings.device`` selects."""
    from .routes import router

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        dev = device or select_device(settings.device)
        registry = Registry(dev)

        def after_failure(exc: BaseException) -> None:
            gc.collect()
            dev.free_memory()

        jobs = JobQueue(on_failure=after_failure)
        app.state.mymps = ServerState(settings, dev, registry, jobs)
        log.info("device %s (%s)", dev.kind, dev.name)
        try:
            yield
        finally:
            jobs.close()

    app = FastAPI(
        title="mymps kernel_server",
        version=server_version(),
        description="Keeps PyTorch / HuggingFace models in device memory and runs work on them.",
        lifespan=lifespan,
    )
    app.include_router(router)

    @app.exception_handler(ServerError)
    async def on_server_error(request: Request, exc: ServerError) -> JSONResponse:
        return JSONResponse(wire.error_body(exc.message), status_code=exc.status)

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

    app.add_middleware(GuardMiddleware, token=token, max_body=settings.max_body)
    return app
