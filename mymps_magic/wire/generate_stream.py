"""The messages of ``/ws/generate`` after the request (:class:`.bodies.GenerateRequest`): JSON
text messages with a ``type``, one constructor and one reader for each (the original's names).

Server -> client: ``token`` (``text``: the next piece), then ``done`` (the closing figures:
``tokens_generated``, ``time_s``, ``tokens_per_s``, ``stop_reason``) or ``error`` (an error body,
:func:`.rest.error_body`, with its ``status``). Client -> server: ``cancel``, stop now; the
server answers with the ``done`` frame (``stop_reason: "cancelled"``) and closes, once the job
is off ``/jobs``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import WireFormatError
from .rest import ErrorBody, error_body, read_error_body

MSG_TOKEN = "token"
MSG_DONE = "done"
MSG_ERROR = "error"
MSG_CANCEL = "cancel"


@dataclass(frozen=True)
class Token:
    """The next piece of generated text."""

    text: str


@dataclass(frozen=True)
class Done:
    """The end of a generation, with the server's figures."""

    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Cancel:
    """The client's request to stop the generation."""


@dataclass(frozen=True)
class Other:
    """A message of a type added later: readers skip it."""

    type: object


GenerateMessage = Token | Done | ErrorBody | Cancel | Other


def token_message(text: str) -> dict[str, Any]:
    return {"type": MSG_TOKEN, "text": text}


def done_message(stats: Mapping[str, Any]) -> dict[str, Any]:
    """The ``done`` message out of a generation's result (its ``text`` went as tokens)."""
    return {"type": MSG_DONE, **{key: value for key, value in stats.items() if key not in ("text", "type")}}


def error_message(message: str, status: int) -> dict[str, Any]:
    return {"type": MSG_ERROR, **error_body(message, status)}


def cancel_message() -> dict[str, Any]:
    return {"type": MSG_CANCEL}


def read_generate_message(raw: str | bytes) -> GenerateMessage:
    """Read one ``/ws/generate`` message, either way.

    Raises:
        WireFormatError: the message is not a JSON object.
    """
    try:
        message = json.loads(raw)
    except ValueError:
        message = None
    if not isinstance(message, dict):
        raise WireFormatError('a /ws/generate message must be a JSON object {"type": ..., ...}')
    kind = message.get("type")
    if kind == MSG_TOKEN:
        return Token(str(message.get("text", "")))
    if kind == MSG_DONE:
        return Done({key: value for key, value in message.items() if key != "type"})
    if kind == MSG_ERROR:
        return read_error_body(message) or ErrorBody("")
    if kind == MSG_CANCEL:
        return Cancel()
    return Other(kind)
