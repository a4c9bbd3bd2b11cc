"""Errors as they cross the wire: the one set of codes, and the session's ``error`` frame.

A code tells the client which of its exceptions to raise; the server picks it where it knows
why a request failed. ``/ws/session`` ``error`` frames carry every code but :data:`ERROR_CONFLICT`;
REST error bodies carry only that one (their HTTP status says the rest).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .frames import Frame

ERROR_REMOTE = "remote"
"""The user's code raised: the frame carries its remote traceback."""

ERROR_PICKLE = "pickle"
"""What was sent (or is to be sent back) could not be pickled or unpickled."""

ERROR_NAME = "name"
"""A pulled name is not defined in the session."""

ERROR_VERSION = "version"
"""Pickled code refused: the two ends' Python or cloudpickle versions differ."""

ERROR_CANCELLED = "cancelled"
"""The call was cancelled (a cancel request, or the server shutting down), not failed."""

ERROR_BAD_REQUEST = "bad_request"
"""The request broke the protocol (a bad id, field or upload); it was not run."""

ERROR_CONFLICT = "conflict"
"""``code`` of a REST 409 that is not a cancellation: the name is loaded as another kind or dtype."""

SESSION_ERROR_CODES = frozenset({ERROR_REMOTE, ERROR_PICKLE, ERROR_NAME, ERROR_VERSION, ERROR_CANCELLED,
                                 ERROR_BAD_REQUEST})


class RemoteFailure(NamedTuple):
    """An ``error`` frame, read: the remote exception's type name, message and traceback lines
    (empty unless ``code`` is :data:`ERROR_REMOTE`), and why it failed."""

    ename: str
    evalue: str
    traceback: list[str]
    code: str


def error(request_id: int, ename: str, evalue: str, traceback: list[str], code: str = ERROR_REMOTE) -> Frame:
    """The ``error`` frame that ends a request; ``code`` is one of :data:`SESSION_ERROR_CODES`."""
    return Frame("error", request_id, {"ename": ename, "evalue": evalue, "traceback": traceback, "code": code})


def read_error(frame: Frame) -> RemoteFailure:
    """Read an ``error`` frame; a code this end does not know is kept, for the caller to treat as
    a server error."""
    fields: dict[str, Any] = frame.fields
    traceback = fields.get("traceback")
    return RemoteFailure(str(fields.get("ename", "")), str(fields.get("evalue", "")),
                         [str(line) for line in traceback] if isinstance(traceback, list) else [],
                         str(fields.get("code", ERROR_REMOTE)))
