"""A generation as ``/chat`` and the OpenAI endpoints run it: the prompt a chat template writes,
the job awaited (and cancelled when its client goes away) or read piece by piece as it runs.

The device work is ``routing.generation_job``'s, the one ``/generate`` runs, so a chat runs at
``/generate``'s token rate; what is added runs on the device worker before it (the template, the
prompt's token count), never on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import Any

from fastapi import Request

from mymps_magic import wire

from .errors import BadRequest, Cancelled, as_server_error
from .jobs import Job
from .registry import LoadedModel
from .routing import generation_job, left_over, next_piece
from .serverstate import ServerState

Prompt = Callable[[LoadedModel], str]
"""Writes a generation's prompt on the device worker, from the loaded model (its tokenizer)."""

GONE = "cancelled: its client went away"


def no_template(model: str) -> str:
    return (f"model {model!r} has no chat template (its tokenizer config has none): send one with the request "
            "as `chat_template` (a Jinja string, e.g. the model family's from the hub; OpenAI clients put it in "
            "extra_body), or write the prompt yourself and use /generate or /v1/completions")


def chat_model(st: ServerState, model: str, template: str | None) -> LoadedModel:
    """The loaded text model a chat is for, checked before anything is queued.

    Raises:
        NotFound: it is not loaded.
        BadRequest: it is not a text model, or neither it nor the request has a chat template.
    """
    loaded = st.registry.get(model, ("text",))
    if template is None and not getattr(loaded.tokenizer, "chat_template", None):
        raise BadRequest(no_template(model))
    return loaded


def chat_prompt(messages: Sequence[wire.ChatMessage], template: str | None) -> Prompt:
    """The prompt of a conversation: the chat template (the request's, else the tokenizer's)
    applied with the assistant's turn opened, as ``tokenizer.apply_chat_template`` writes it.

    A template that writes the begin-of-text token into the text loses it when the tokenizer adds
    that token itself, or the model would see it twice.
    """

    def write(loaded: LoadedModel) -> str:
        tokenizer = loaded.tokenizer
        try:
            text = str(tokenizer.apply_chat_template([m.to_json() for m in messages], chat_template=template,
                                                     add_generation_prompt=True, tokenize=False))
        except Exception as exc:  # a template is code: whatever it raises (raise_exception, 1/0) is the caller's
            raise BadRequest(f"the chat template failed: {_reason(exc)}") from None
        bos = getattr(tokenizer, "bos_token", None)
        if bos and text.startswith(bos) and tokenizer("").input_ids[:1] == [tokenizer.bos_token_id]:
            text = text[len(bos):]
        return text

    return write


def _reason(exc: Exception) -> str:
    """The one line of a template's failure: its own message (``raise_exception``'s), else the
    exception's type and message."""
    from jinja2 import TemplateError

    lines = str(exc).strip().splitlines()
    if isinstance(exc, TemplateError) and lines:
        return lines[0]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def submit(st: ServerState, model: str, prompt: Prompt, params: wire.GenerateRequest,
           on_text: Callable[[str], None] | None) -> Job:
    """Queue the generation ``params`` asks for, its prompt written by ``prompt`` on the worker,
    and keep the model loaded as its ``keep_alive`` says; the job's result is ``/generate``'s."""

    def work(job: Job) -> dict[str, Any]:
        text = prompt(st.registry.get(model, ("text",)))
        result: dict[str, Any] = generation_job(st, replace(params, prompt=text), on_text)(job)
        return result

    job = st.jobs.submit(work, "generate", model=model)
    st.lifetime.touch(model, params.keep_alive)  # after the submit: a keep_alive of 0 waits for this job
    return job


async def answer(st: ServerState, request: Request, job: Job) -> dict[str, Any] | None:
    """The job's result, or None once the HTTP client went away first (the job is then
    cancelled at its next token, as ``POST /generate``'s is).

    Raises:
        ServerError: the job failed, or was cancelled from elsewhere.
    """
    done = asyncio.wrap_future(job)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not done.done():
        st.jobs.abandon(job, GONE)
        await asyncio.wait({done}, timeout=2)  # the worker stops at the next token
        return None
    return result_of(job, done)


def result_of(job: Job, done: asyncio.Future[Any]) -> dict[str, Any]:
    """A finished job's result, or the error its client is told."""
    try:
        return done.result()  # type: ignore[no-any-return]
    except asyncio.CancelledError:
        raise Cancelled(f"job {job.id} was {job.cancel_reason}") from None
    except BaseException as exc:
        raise as_server_error(exc) from exc


async def _disconnected(request: Request) -> None:
    """Return once the HTTP client has gone away (its body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class JobPieces:
    """A generation queued now whose text is read as it comes: ``async for piece in pieces``,
    then :meth:`result`. Whoever reads it calls :meth:`abandon` when done (a ``finally``), which
    cancels the job if its reader left before the end. ``start`` queues the job, given the
    callback that takes each piece from the device worker."""

    def __init__(self, st: ServerState, start: Callable[[Callable[[str], None]], Job]) -> None:
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._st = st

        def on_text(text: str) -> None:
            loop.call_soon_threadsafe(self._queue.put_nowait, text)

        self.job = start(on_text)
        self.done = asyncio.wrap_future(self.job)

    async def __aiter__(self) -> AsyncIterator[str]:
        while (piece := await next_piece(self._queue, self.done)) is not None:
            yield piece
        for piece in left_over(self._queue):
            yield piece

    async def until(self, stop: asyncio.Future[Any]) -> AsyncIterator[str]:
        """The pieces until the job ends or ``stop`` (a message from the client) comes first."""
        while (piece := await next_piece(self._queue, self.done, stop)) is not None:
            yield piece

    def left(self) -> list[str]:
        return left_over(self._queue)

    def result(self) -> dict[str, Any]:
        """The finished job's result (call after the pieces ran out).

        Raises:
            ServerError: the job failed or was cancelled.
        """
        return result_of(self.job, self.done)

    def abandon(self, reason: str = GONE) -> None:
        self._st.jobs.abandon(self.job, reason)


class Pieces(JobPieces):
    """:class:`JobPieces` of a generation whose prompt ``prompt`` writes on the worker (:func:`submit`'s)."""

    def __init__(self, st: ServerState, model: str, prompt: Prompt, params: wire.GenerateRequest) -> None:
        super().__init__(st, lambda on_text: submit(st, model, prompt, params, on_text))
