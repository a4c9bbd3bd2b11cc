"""`create_app`: the dashboard's pages and actions, a thin layer over a `Client`.

The page asks for everything it shows: ``GET /status`` (the refreshed part, as HTML) only runs
when an open page asks, so a dashboard nobody looks at sends nothing to the accelerator. The
actions are POSTs of JSON (guarded by `SameOriginGuard`): unload and cancel answer JSON, load and
generate answer NDJSON lines as they happen, which the page reads as a stream. The token lives
in the `Client` here and never leaves this process.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from mymps_magic import wire
from mymps_magic._connection import Connection
from mymps_magic.client import DEFAULT_TIMEOUT, Client
from mymps_magic.dashboard.guard import SameOriginGuard
from mymps_magic.dashboard.loading import load_events
from mymps_magic.dashboard.settings import DashboardSettings
from mymps_magic.dashboard.status import ErrorLog, collect
from mymps_magic.errors import MympsError

HERE = Path(__file__).parent
KINDS = ("detect", "text", "diffusion", "auto", "torchscript", "checkpoint")
DTYPES = ("auto", "float32", "float16", "bfloat16")
MAX_NEW_TOKENS = 64


class BadAction(Exception):
    """A POST body the page would never send; answered with a 400 naming the field."""


def create_app(client: Client, settings: DashboardSettings) -> Starlette:
    """The dashboard as an ASGI application.

    Args:
        client: how the dashboard reaches the server; it keeps the token.
        settings: where the dashboard listens (``--allow-remote`` relaxes the Host check) and
            how often the page refreshes.

    Returns:
        The Starlette app; the caller closes ``client`` when it is done serving.
    """
    templates = Jinja2Templates(directory=HERE / "templates")
    log = ErrorLog()
    loads = Connection(client.settings, DEFAULT_TIMEOUT)

    async def page(request: Request) -> Response:
        view = await run_in_threadpool(collect, client, log)
        context = {"view": view, "kinds": KINDS, "dtypes": DTYPES, "refresh_ms": int(settings.refresh_s * 1000),
                   "max_new_tokens": MAX_NEW_TOKENS}
        return templates.TemplateResponse(request, "page.html", context)

    async def status(request: Request) -> Response:
        view = await run_in_threadpool(collect, client, log)
        return templates.TemplateResponse(request, "status.html", {"view": view})

    async def unload(request: Request) -> Response:
        name = _field(await _body(request), "name")
        return await _act(log, f"unload {name}", lambda: client.unload_model(name),
                          lambda answer: f"unloaded {name}, freed {answer.get('freed_bytes', 0)} bytes")

    async def cancel(request: Request) -> Response:
        job_id = _field(await _body(request), "id")
        return await _act(log, f"cancel {job_id}", lambda: client.cancel(job_id), lambda _: f"cancelled {job_id}")

    async def load(request: Request) -> Response:
        body = await _body(request)
        name, kind, dtype = _field(body, "name"), _choice(body, "kind", KINDS), _choice(body, "dtype", DTYPES)
        events = load_events(loads, log, name, None if kind == "detect" else kind, dtype)
        return StreamingResponse(_ndjson(events), media_type=wire.NDJSON)

    async def generate(request: Request) -> Response:
        body = await _body(request)
        model, prompt = _field(body, "model"), _field(body, "prompt")
        limit = body.get("max_new_tokens", MAX_NEW_TOKENS)
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise BadAction("max_new_tokens must be a whole number")
        return StreamingResponse(_generation(client, log, model, prompt, limit), media_type=wire.NDJSON)

    async def bad_action(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=400)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        loads.close()

    return Starlette(
        routes=[
            Route("/", page),
            Route("/status", status),
            Route("/unload", unload, methods=["POST"]),
            Route("/cancel", cancel, methods=["POST"]),
            Route("/load", load, methods=["POST"]),
            Route("/generate", generate, methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ],
        middleware=[Middleware(SameOriginGuard, allow_any_host=settings.allow_remote)],
        exception_handlers={BadAction: bad_action},
        lifespan=lifespan,
    )


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise BadAction("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise BadAction("the body must be a JSON object")
    return body


def _field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise BadAction(f"{name} is missing; fill it in")
    return value.strip()


def _choice(body: dict[str, Any], name: str, allowed: tuple[str, ...]) -> str:
    value = body.get(name, allowed[0])
    if value not in allowed:
        raise BadAction(f"{name} {value!r} is not one of {', '.join(allowed)}")
    return str(value)


async def _act(log: ErrorLog, what: str, call: Callable[[], dict[str, Any]],
               say: Callable[[dict[str, Any]], str]) -> Response:
    """Run a blocking client call off the event loop; its `MympsError` becomes an error answer."""
    try:
        answer = await run_in_threadpool(call)
    except MympsError as exc:
        log.add(f"{what}: {exc}")
        return JSONResponse({"error": str(exc)}, status_code=409)
    return JSONResponse({"message": say(answer)})


def _ndjson(events: Iterator[dict[str, Any]]) -> Iterator[str]:
    for event in events:
        yield json.dumps(event) + "\n"


async def _generation(client: Client, log: ErrorLog, model: str, prompt: str, limit: int) -> AsyncIterator[str]:
    """The pieces of a streamed generation as NDJSON ``{"text"}`` lines, then ``{"done": stats}``
    or ``{"error"}``. The page going away cancels this generator, and leaving the stream early
    cancels the generation on the server."""
    try:
        async with client.stream_generate(model, prompt, max_new_tokens=limit) as stream:
            async for piece in stream:
                yield json.dumps({"text": piece}) + "\n"
        yield json.dumps({"done": stream.stats}) + "\n"
    except MympsError as exc:
        log.add(f"generate with {model}: {exc}")
        yield json.dumps({"error": str(exc)}) + "\n"
