"""The errors a mymps client raises: one tree, one line each, saying what to do.

```
MympsError
├── ConnectionError    (also builtins.ConnectionError) server not reachable, or the link dropped
├── TimeoutError       (also builtins.TimeoutError)    no answer in time
├── AuthError                                          token missing or refused (HTTP 401/403)
├── NotFoundError      (also LookupError)              unknown model, job or path (HTTP 404)
├── BadRequestError    (also ValueError)               bad argument or setting (HTTP 400/413/422, and
│                                                      409 "conflict": loaded as another kind/dtype)
├── ServerError                                        the server failed (HTTP 5xx, 507 = out of memory)
├── RemoteError                                        user code raised on the server
├── PicklingError      (also pickle.PicklingError)     a value or function cannot cross the wire
├── RemoteNameError    (also NameError)                `pull` of a name the remote session lacks
├── VersionMismatchError                               Python/cloudpickle differ: pickled code refused
├── CancelledError     (also concurrent.futures.CancelledError)  the call was cancelled before it ran
├── ClosedError        (a ConnectionError)             the server closed the connection and said why
├── SessionLostError   (a ConnectionError)             the server no longer has this session
│   └── ServerGoneError                                its process ended while running a call
└── CommandError                                       `mymps tunnel`, `deploy` or `demo` cannot go on
    └── ServerStartError (mymps_magic.cli.localserver)  a local server did not come up (demo, tests)
```

In IPython every one of them shows as its one line (``_render_traceback_``), not as a stack of
client frames; a `RemoteError` shows the remote traceback instead.

Transports are translated into these types at one boundary (`_connection.py`); nothing above it
sees an httpx or websockets exception. Messages never contain the token.
"""

from __future__ import annotations

import builtins
import concurrent.futures
import pickle
from typing import Any

from mymps_magic import wire

__all__ = [
    "AuthError",
    "BadRequestError",
    "CancelledError",
    "ClosedError",
    "CommandError",
    "ConnectionError",
    "MympsError",
    "NotFoundError",
    "PicklingError",
    "RemoteError",
    "RemoteNameError",
    "ServerError",
    "ServerGoneError",
    "SessionLostError",
    "TimeoutError",
    "VersionMismatchError",
    "error_for_status",
]


class MympsError(Exception):
    """Base of every error mymps raises; its message is one line that says what to do.

    Args:
        message: the line shown to the user.
        status_code: the HTTP status the server answered with, when the error came from one.
    """

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code

    def __str__(self) -> str:
        return self.message

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self.message}"]


class ConnectionError(MympsError, builtins.ConnectionError):
    """The server cannot be reached, or the connection dropped before the answer came."""


class TimeoutError(MympsError, builtins.TimeoutError):
    """The server did not answer within the client's timeout."""


class AuthError(MympsError):
    """The server needs a token and got none, or refused the one it got."""


class NotFoundError(MympsError, LookupError):
    """The server has no such model, job or path; the message lists what it has where it can."""


class BadRequestError(MympsError, ValueError):
    """An argument or setting is wrong: found locally, or rejected by the server (400, 413, 422)."""


class CommandError(MympsError):
    """A `mymps` verb (``tunnel``, ``deploy``) cannot go on: ssh failed, no host was given, or
    there is nothing to deploy. The CLI prints the message as its one line and exits non-zero."""


class ServerError(MympsError):
    """The server failed while handling a valid request (5xx; 507 means the device is out of memory)."""


class RemoteError(MympsError):
    """An exception raised by user code on the server, carried back with its remote traceback.

    IPython calls `_render_traceback_` to show it, so a notebook shows the remote stack the way
    it would show a local one, instead of the client-side frames that merely received it.

    Args:
        ename: the remote exception's type name, e.g. ``"ZeroDivisionError"``.
        evalue: its message.
        traceback: the remote traceback, one string per line (server frames already trimmed).
    """

    def __init__(self, ename: str, evalue: str = "", traceback: list[str] | None = None) -> None:
        super().__init__(f"{ename}: {evalue}" if evalue else ename)
        self.ename = ename
        self.evalue = evalue
        self.traceback = list(traceback or [])

    @property
    def traceback(self) -> list[str]:
        return self._traceback

    @traceback.setter
    def traceback(self, lines: list[str]) -> None:
        """Outside IPython (a plain script, pytest, a log) Python prints an exception's chain,
        not `_render_traceback_`: the remote frames travel as the ``__cause__``, as
        ``concurrent.futures.ProcessPoolExecutor`` shows a worker's traceback."""
        self._traceback = lines
        self.__cause__ = RemoteTraceback("".join(lines)) if lines else None

    def __str__(self) -> str:
        # A subclass named after the remote type (``mymps_magic.remote.KeyError``) says the
        # type already: its message is the remote one alone, as a local exception's would be.
        return self.evalue if type(self).__name__ == self.ename else self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # By its own class: one of ``mymps_magic.remote``'s pickles by reference to that module,
        # whose ``__getattr__`` makes it again; so this module never imports that one back.
        return type(self), (self.ename, self.evalue, self._traceback)

    def _render_traceback_(self) -> list[str]:
        lines = [line for chunk in self.traceback for line in chunk.splitlines()]
        return lines if lines else [self.message]


class RemoteTraceback(Exception):
    """The traceback of user code on the server, shown as the cause of its `RemoteError`."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "the remote code raised it here:\n" + self.text.rstrip("\n")


class PicklingError(MympsError, pickle.PicklingError):
    """A value, function or return value cannot be pickled, or the other end cannot unpickle it."""


class RemoteNameError(MympsError, NameError):
    """``pull`` asked for a name that the remote session does not define."""


class VersionMismatchError(MympsError):
    """The two ends run different Python ``major.minor`` or cloudpickle versions."""


class CancelledError(MympsError, concurrent.futures.CancelledError):
    """The call was cancelled (or the server dropped it) before it ran."""


class ClosedError(ConnectionError):
    """The server closed the WebSocket with a close code and a reason, which the message shows
    (a protocol version mismatch, a message over ``--max-body``, a session taken over).

    Args:
        message: the line shown to the user.
        close_code: the WebSocket close code the server sent.
    """

    def __init__(self, message: str, *, close_code: int | None = None) -> None:
        super().__init__(message)
        self.close_code = close_code

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_closed, (self.message, self.close_code)


def _rebuild_closed(message: str, close_code: int | None) -> ClosedError:
    return ClosedError(message, close_code=close_code)


class SessionLostError(ConnectionError):
    """The server no longer has this client's session: it restarted or the session idled out.

    Every session call raises it until the user says they know (``reset()``, ``%mymps reset``,
    or a new `Client`): a call never runs in an empty namespace by surprise.
    """


class ServerGoneError(SessionLostError):
    """The server process ended while running a call (user code that calls ``os._exit`` or
    crashes ends it), and the session went with it."""


def error_for_status(status_code: int, message: str, code: str | None = None) -> MympsError:
    """The error for a server answer with HTTP status ``status_code`` and the server's message.

    Authentication failures are not passed here: their message depends on where the client's
    token came from, which only the client knows.

    Args:
        status_code: the HTTP status (or the ``status`` field of an error frame).
        message: the server's one-line ``error``; kept as it is, because the server knows what
            went wrong (an unknown model's message lists the loaded ones).
        code: the body's ``code``: ``"conflict"`` tells a 409 that asks to unload first from
            one that says the job was cancelled.

    Returns:
        A `NotFoundError`, `BadRequestError`, `CancelledError` (409: the job was cancelled) or
        `ServerError` carrying ``status_code``.
    """
    if status_code == 404:
        return NotFoundError(message, status_code=status_code)
    if status_code in (400, 413, 422) or (status_code == 409 and code == wire.ERROR_CONFLICT):
        return BadRequestError(message, status_code=status_code)
    if status_code == 409:
        return CancelledError(message, status_code=status_code)
    return ServerError(message, status_code=status_code)
