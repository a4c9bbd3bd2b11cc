"""What the REST and WebSocket endpoints share: the server state, a job awaited, the
generation job, and the pump that forwards a job's pieces while it runs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Request, WebSocket

from mymps_magic import wire

from . import generation
from .errors import Cancelled, as_server_error
from .jobs import SHUTDOWN_REASON, Job
from .serverstate import ServerState

T = TypeVar("T")


def state_of(request: Request | WebSocket) -> ServerState:
    return request.app.state.mymps  # type: ignore[no-any-return]


async def run_job(st: ServerState, fn: Callable[[Job], Any], kind: str, model: str | None = None) -> Any:
    """Queue ``fn`` as a job and await it; its failure becomes the error the client sees."""
    try:
        return await st.jobs.run(fn, kind, model=model)
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        raise as_server_error(exc) from exc


def generation_job(st: ServerState, params: wire.GenerateRequest,
                   on_text: Callable[[str], None] | None) -> Callable[[Job], Any]:
    """The device work of ``POST /generate`` and ``/ws/generate``; ``on_text`` gets each piece."""

    def work(job: Job) -> dict[str, Any]:
        loaded = st.registry.get(params.model, ("text",))

        def on_progress(fraction: float) -> None:
            job.progress = fraction

        result = generation.generate(loaded, params, lambda: job.cancelled_flag, on_text, on_progress)
        if job.cancel_reason == SHUTDOWN_REASON:  # not the user's choice: say so, not a partial text
            raise Cancelled(f"the generation was {SHUTDOWN_REASON}; start it again when the server is back")
        return result

    return work


async def next_piece(pieces: asyncio.Queue[T], *stops: asyncio.Future[Any]) -> T | None:
    """The next piece a running job put on ``pieces``, or None once one of ``stops`` (the job
    itself, a message from the client) is done first; then :func:`left_over` has what remains."""
    getter = asyncio.ensure_future(pieces.get())
    await asyncio.wait({getter, *stops}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    return None


def left_over(pieces: asyncio.Queue[T]) -> list[T]:
    """The pieces still queued once :func:`next_piece` said stop, in order."""
    found = []
    while not pieces.empty():
        found.append(pieces.get_nowait())
    return found
