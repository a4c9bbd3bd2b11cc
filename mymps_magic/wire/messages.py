"""Session frames by kind: one constructor and one reader each, used by both ends.

The tables of kinds and their fields are in the package docstring. Readers check what the
other end could get wrong and raise `WireFormatError` (or, for a request's fields, the
`TypeError`/`ValueError` the server answers with a ``bad_request`` error); the frames of the
hot path (``run``, ``result``) are built and read without a copy or a layer of checks.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Any, NamedTuple

from . import frames
from .errors import WireFormatError
from .frames import Frame

REQUEST_KINDS = frozenset({"run", "cell", "push", "pull", "interrupt", "cancel", "reset"})
"""Client -> server frames that are requests (numbered, answered by ``result`` or ``error``)."""

# -- client -> server --------------------------------------------------------------------------


def hello(session: str | None, last_seq: int) -> Frame:
    """The first frame of a connection: the session to resume and the last frame seen of it, and
    whether this end has torch (the server sends a cell's tensor value only to a client that does)."""
    return Frame("hello", 0, {"session": session, "last_seq": last_seq, "python": frames.PYTHON_VERSION,
                              "cloudpickle": frames.cloudpickle_version(), "protocol": frames.PROTOCOL_VERSION,
                              "torch": _has_torch()})


@functools.cache
def _has_torch() -> bool:
    """Whether torch is installed here, found without importing it (the client never does)."""
    return importlib.util.find_spec("torch") is not None


@dataclass(frozen=True)
class Hello:
    session: str | None
    last_seq: int
    python: str
    cloudpickle: str
    torch: bool


def read_hello(frame: Frame) -> Hello:
    """Raises:
        WireFormatError: not a hello, or its session or last_seq are of the wrong type."""
    if frame.type != "hello":
        raise WireFormatError("the first frame must be 'hello'")
    session, last_seq = frame.get("session"), frame.get("last_seq") or 0
    if not isinstance(session, (str, type(None))) or not isinstance(last_seq, int):
        raise WireFormatError("hello's session must be a string or null and last_seq a number")
    return Hello(session, last_seq, str(frame.get("python")), str(frame.get("cloudpickle")), frame.get("torch") is True)


def request(kind: str, request_id: int, ack: int, fields: dict[str, Any] | None = None,
            buffers: list[Any] | None = None) -> Frame:
    """A request of one of :data:`REQUEST_KINDS`, carrying the client's ``ack``. Its fields: ``run``
    ``fn`` (or none), ``cell`` ``source``, ``pull`` ``names``, ``interrupt``/``cancel``
    ``target``; any: ``upload`` (buffers sent ahead), ``notify_start`` (send ``started``). Another
    kind is sent as it is: the server, not the client, answers it with a ``bad_request`` error."""
    return Frame(kind, request_id, {**(fields or {}), "ack": ack}, buffers if buffers is not None else [])


def read_ack(frame: Frame) -> int | None:
    """The client's ack a frame carries (an ``ack`` frame's ``seq``, a request's ``ack``), or None."""
    if frame.type == "ack":
        return int(frame.get("seq", 0))
    return int(frame.fields["ack"]) if "ack" in frame.fields else None


def read_target(frame: Frame) -> int:
    """The request an ``interrupt`` or ``cancel`` aims at (0: whatever of the session runs)."""
    return int(frame.get("target", 0))


def read_source(frame: Frame) -> str:
    """A ``cell`` request's source."""
    source = frame.get("source")
    if not isinstance(source, str):
        raise ValueError("a cell request needs its source as a string")
    return source


def read_names(frame: Frame) -> list[str]:
    """A ``pull`` request's names."""
    return [str(name) for name in frame.get("names", [])]


def ack(seq: int) -> Frame:
    """Acknowledge every server frame up to ``seq``, when no request carries it soon."""
    return Frame("ack", 0, {"seq": seq})


def upload(buffers: list[Any]) -> Frame:
    """The buffers of a large request, written as an upload's body by `encode_stream`."""
    return Frame("upload", 0, {}, buffers)


# -- server -> client --------------------------------------------------------------------------


def welcome(session: str, resumed: bool, python_full: str, server: str, last_request: int,
            mismatch: str | None, session_buffer: int) -> Frame:
    return Frame("welcome", 0, {
        "session": session, "resumed": resumed, "python": frames.PYTHON_VERSION, "python_full": python_full,
        "cloudpickle": frames.cloudpickle_version(), "server": server, "last_request": last_request,
        "mismatch": mismatch, "session_buffer": session_buffer,
    })


@dataclass(frozen=True)
class Welcome:
    session: str
    resumed: bool
    last_request: int
    mismatch: str | None
    session_buffer: int | None


def read_welcome(frame: Frame | None) -> Welcome:
    """Raises:
        WireFormatError: not a welcome (the other end is no mymps server of this version)."""
    if frame is None or frame.type != "welcome" or not isinstance(frame.get("session"), str):
        raise WireFormatError("the server did not answer the session hello with a welcome")
    buffer, mismatch = frame.get("session_buffer"), frame.get("mismatch")
    return Welcome(frame["session"], bool(frame.get("resumed")), int(frame.get("last_request") or 0),
                   mismatch if isinstance(mismatch, str) else None,
                   buffer if isinstance(buffer, int) and buffer > 0 else None)


def started(request_id: int, job_id: str) -> Frame:
    """The request left the queue and runs now, as job ``job_id`` of ``/jobs``."""
    return Frame("started", request_id, {"job": job_id})


def read_started(frame: Frame) -> str | None:
    job = frame.get("job")
    return job if isinstance(job, str) else None


def stream(request_id: int, name: str, text: str) -> Frame:
    """Text the request wrote to ``name`` ("stdout" or "stderr")."""
    return Frame("stream", request_id, {"name": name, "text": text})


def display(request_id: int, data: dict[str, Any], metadata: dict[str, Any]) -> Frame:
    """A mimebundle the request displayed."""
    return Frame("display", request_id, {"data": data, "metadata": metadata})


def progress(request_id: int, bar: int, fields: dict[str, Any]) -> Frame:
    """A progress bar's state: ``n``, ``total``, ``desc``, ``unit``, ``elapsed``, ``closed``."""
    return Frame("progress", request_id, {"bar": bar, **fields})


class Output(NamedTuple):
    """An output frame, read: ``stream`` (name, text), ``display`` (data, metadata) or
    ``progress`` (the bar's fields, ``bar`` included, in ``data``)."""

    kind: str
    name: str
    text: str
    data: dict[str, Any]
    metadata: dict[str, Any] | None


def read_output(frame: Frame) -> Output:
    if frame.type == "stream":
        return Output("stream", str(frame["name"]), str(frame["text"]), {}, None)
    if frame.type == "display":
        return Output("display", "", "", frame["data"], frame.get("metadata"))
    return Output(frame.type, "", "", frame.fields, None)


def answer(request_id: int, **fields: Any) -> Frame:
    """A ``result`` with small plain ``fields`` (no pickle): ``{cancelled}`` of a cancel,
    ``{names}`` of a push, nothing for an interrupt or reset."""
    return Frame("result", request_id, {"fields": fields})


def result(request_id: int, buffers: list[Any], mime: dict[str, Any] | None = None, handle: str | None = None
           ) -> Frame:
    """A ``result`` carrying a pickled value (``wire.dumps``); for a cell's value, its mimebundle
    and the name the server keeps it under."""
    return Frame("result", request_id, {} if mime is None else {"mime": mime, "handle": handle}, buffers)


def kept(request_id: int, mime: dict[str, Any], handle: str, reason: str) -> Frame:
    """A cell's value that stays on the server: its mimebundle, the name it is kept under (a
    ``pull`` of it moves it), and why it did not come (not plain data, or it did not pickle)."""
    return Frame("result", request_id, {"kept": reason, "mime": mime, "handle": handle})


class Result(NamedTuple):
    """A ``result`` frame, read: exactly one of ``fields`` (an answer), ``kept`` (a cell's value
    left on the server, with its ``mime`` and ``handle``) or ``buffers`` (a pickled value, with
    ``mime`` and ``handle`` for a cell's value) holds."""

    fields: dict[str, Any] | None
    kept: str | None
    mime: dict[str, Any] | None
    handle: str | None
    buffers: list[Any]


def read_result(frame: Frame) -> Result:
    f = frame.fields
    return Result(f.get("fields"), f.get("kept") or None, f.get("mime"), f.get("handle"), frame.buffers)
