"""The REST endpoints: thin over the registry, the job queue and the workers.

Metadata endpoints read shared state directly and never queue; everything that touches the
device is a job, awaited without blocking the event loop. The WebSocket endpoints and the
session upload are in ``streams.py``, whose router this one includes.
"""

from __future__ import annotations

import asyncio
import platform
import time
from collections.abc import AsyncIterator
from typing import Any

import psutil
import torch
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from mymps_magic import wire

from . import inference, streams
from .errors import BadRequest, Unprocessable, as_server_error
from .jobs import Job
from .lifecycle import NO_RESTARTS, Restarts
from .routing import generation_job, left_over, next_piece, run_job, state_of
from .schemas import GenerateBody, ImageBody, LoadBody
from .serverstate import ServerState, server_version
from .textjobs import answer

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """Liveness and identity; the one endpoint that needs no token.

    The original's keys with the original's meaning (``mps_available`` and ``mps_built`` from
    ``torch.backends.mps``, ``device`` the torch device the models run on: ``mps``, ``cuda`` or
    ``cpu``, ``torch_version``, ``models_loaded`` a count), beside ours (``models``: the names;
    ``restarts`` and ``last_crash``: what ``mymps serve`` restarted this server after, if it did).
    """
    st = state_of(request)
    restarts: Restarts = getattr(request.app.state, "restarts", NO_RESTARTS)
    names = st.registry.names()
    return {
        "status": "ok",
        "version": server_version(),
        "protocol": wire.PROTOCOL_VERSION,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_version": torch.__version__,
        "mps_available": torch.backends.mps.is_available(),
        "mps_built": torch.backends.mps.is_built(),
        "device": st.device.kind,
        "device_name": st.device.name,
        "models": names,
        "models_loaded": len(names),
        "uptime_s": round(time.time() - st.started_at, 1),
        "restarts": restarts.count,
        "last_crash": restarts.last_crash,
    }


@router.get("/stats")
async def stats(request: Request) -> dict[str, Any]:
    st = state_of(request)
    vm = psutil.virtual_memory()
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "ram": {"used": vm.total - vm.available, "total": vm.total},
        "device": st.device.describe(),
        "jobs": st.jobs.counts(),
    }


@router.get("/models")
async def list_models(request: Request) -> list[dict[str, Any]]:
    """The loaded models as the original listed them, a plain list of ``{name, device,
    loaded_at, ...}``, each with our fields too (kind, dtype, parameters, bytes, last_used...)."""
    return state_of(request).registry.describe()


def _loaded_answer(st: ServerState, name: str, started: float, already: bool,
                   ignored: list[str]) -> dict[str, Any]:
    """The load's answer; ``ignored`` lists the request's fields this endpoint does not know,
    ``evicted`` the models unloaded to make room. Made while nothing can unload the model: in
    the load's job, or before a ``keep_alive`` of 0 applies."""
    model = st.registry.get(name)
    answer = {
        "status": "ok",
        "name": name,
        "device": st.device.kind,
        "kind": model.kind,
        "dtype": model.describe()["dtype"],
        "load_time_s": round(time.perf_counter() - started, 3),
        "already_loaded": already,
        "evicted": [] if already else list(model.evicted),
    }
    if already:
        answer["message"] = f"{name} was already loaded; nothing to do"
    if ignored:
        answer["ignored"] = ignored
    return answer


@router.post("/models/load")
async def load_model(body: LoadBody, request: Request) -> Any:
    """Load a model; with ``Accept: application/x-ndjson`` progress streams as NDJSON lines."""
    st = state_of(request)
    started = time.perf_counter()
    ndjson = wire.NDJSON in request.headers.get("accept", "")
    load_request, ignored = body.request(), body.ignored()
    if st.registry.already_loaded(load_request):  # or a 409: loaded as another kind or dtype
        answer = _loaded_answer(st, load_request.name, started, True, ignored)
        st.lifetime.touch(load_request.name, load_request.keep_alive)
        return Response(wire.ndjson_line(answer), media_type=wire.NDJSON) if ndjson else answer
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def work(job: Job) -> dict[str, Any]:
        if st.registry.already_loaded(load_request):  # loaded by a request queued before this one
            st.lifetime.touch(load_request.name, load_request.keep_alive)
            return _loaded_answer(st, load_request.name, started, True, ignored)

        def progress(stage: str, fraction: float, message: str) -> None:
            job.progress = fraction
            loop.call_soon_threadsafe(events.put_nowait, wire.progress_event(stage, fraction, message))

        st.registry.load(load_request, progress, job.check_cancelled)
        return _loaded_answer(st, load_request.name, started, False, ignored)

    if not ndjson:
        return await run_job(st, work, "load", load_request.name)

    job = st.jobs.submit(work, "load", model=load_request.name)

    async def stream() -> AsyncIterator[bytes]:
        done = asyncio.wrap_future(job)
        try:
            while (event := await next_piece(events, done)) is not None:
                yield wire.ndjson_line(event)
            for event in left_over(events):
                yield wire.ndjson_line(event)
            try:
                yield wire.ndjson_line(done.result())
            except BaseException as exc:
                err = as_server_error(exc)
                yield wire.ndjson_line(wire.error_body(err.message, err.status, err.code))
        finally:
            st.jobs.abandon(job, "cancelled: its client went away")

    return StreamingResponse(stream(), media_type=wire.NDJSON)


@router.delete("/models/{name:path}")
async def unload_model(name: str, request: Request) -> dict[str, Any]:
    st = state_of(request)
    st.registry.get(name)  # a fast 404 before queueing
    freed = await run_job(st, lambda job: st.registry.unload(name), "unload", name)
    return {"status": "ok", "name": name, "freed_bytes": freed}


@router.get("/models/{name:path}/info")
async def model_info(name: str, request: Request) -> dict[str, Any]:
    return state_of(request).registry.get(name).info()


@router.get("/jobs")
async def list_jobs(request: Request) -> dict[str, Any]:
    return {"jobs": state_of(request).jobs.list()}


@router.delete("/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request) -> dict[str, Any]:
    job = state_of(request).jobs.cancel(job_id, "cancelled by DELETE /jobs")
    return {"status": "ok", "id": job.id, "cancelled": True}


@router.post("/infer", response_class=Response, responses={200: {"content": {wire.MSGPACK: {}}}})
async def infer(request: Request) -> Response:
    """Forward pass: a msgpack tensor map in, the outputs as a msgpack tensor map out, floating
    ones as float32 (the original's) unless the ``x-dtype: native`` header asks for the model's."""
    st = state_of(request)
    name = request.headers.get(wire.HEADER_MODEL)
    if not name:
        raise Unprocessable(f"name the model in the {wire.HEADER_MODEL!r} header")
    dtype = request.headers.get(wire.HEADER_DTYPE, wire.DTYPE_FLOAT32)
    if dtype not in (wire.DTYPE_FLOAT32, wire.DTYPE_NATIVE):
        raise BadRequest(f"the {wire.HEADER_DTYPE!r} header must be {wire.DTYPE_FLOAT32!r} (the default) or "
                         f"{wire.DTYPE_NATIVE!r} (the model's own dtype), not {dtype!r}")
    st.registry.get(name)
    try:
        inputs = wire.unpack_tensors(await request.body())
    except wire.WireFormatError as exc:
        raise BadRequest(str(exc)) from None
    native = dtype == wire.DTYPE_NATIVE

    def work(job: Job) -> dict[str, Any]:
        st.lifetime.touch(name)  # from the running job: its end restarts the model's timer
        return inference.infer(st.registry.get(name), inputs, native)

    outputs = await run_job(st, work, "infer", name)
    return Response(wire.pack_tensors(outputs), media_type=wire.MSGPACK)


@router.post("/generate")
async def generate(body: GenerateBody, request: Request) -> dict[str, Any]:
    """Generate; a client that goes away before the answer cancels it at the next token, as on
    ``/ws/generate``, so the device is free for the next caller within a moment. Fields of the
    request this endpoint does not know are listed in the answer's ``ignored``."""
    st = state_of(request)
    params = body.request()
    st.registry.get(params.model, ("text",))
    job = st.jobs.submit(generation_job(st, params, None), "generate", model=params.model)
    st.lifetime.touch(params.model, params.keep_alive)
    result = await answer(st, request, job)
    if result is None:
        return Response(status_code=499)  # type: ignore[return-value]  # nobody reads it
    ignored = body.ignored()
    return {**result, "ignored": ignored} if ignored else result


@router.post("/image")
async def image(body: ImageBody, request: Request) -> dict[str, Any]:
    st = state_of(request)
    asked = body.request()
    st.registry.get(asked.model, ("diffusion",))

    def work(job: Job) -> dict[str, Any]:
        def on_progress(fraction: float) -> None:
            job.progress = fraction

        loaded = st.registry.get(asked.model, ("diffusion",))
        st.lifetime.touch(asked.model)  # from the running job: its end restarts the model's timer
        return inference.image(loaded, asked, check_cancelled=job.check_cancelled, on_progress=on_progress)

    return await run_job(st, work, "image", asked.model)  # type: ignore[no-any-return]


router.include_router(streams.router)
