"""RemoteFuture and what a session request ends as: a value, a cell's `RemoteValue`, or a mymps error.

The session channel (``_session.py``) reads the final ``result`` or ``error`` frame of each
request; this module turns it into what the caller gets.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

from mymps_magic import errors, wire
from mymps_magic._pickling import fill_sources
from mymps_magic.display import RemoteValue
from mymps_magic.remote import _remote_error


class RemoteFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """The outcome of a remote call; ``cancel()`` drops it from the server's queue if it has
    not started, and returns False once it runs, as ``concurrent.futures`` does.

    Args:
        request_id: the session request it waits for.
        withdraw: asks the server to drop a request that has not started and, if it did, stops
            waiting for it; True then. Handed in by the session channel, which makes the future,
            so this module never calls back into the channel's.
    """

    def __init__(self, request_id: int, withdraw: Callable[[int], bool]) -> None:
        super().__init__()
        self.request_id = request_id
        self.job_id: str | None = None
        self._withdraw = withdraw

    def cancel(self) -> bool:
        if self.done():
            return self.cancelled()
        if self.running() or not self._withdraw(self.request_id):
            return False
        return super().cancel()


def settle(future: RemoteFuture, frame: wire.Frame, source: Any = None) -> None:
    """Complete the future from a ``result`` or ``error`` frame."""
    if future.cancelled():
        return
    if not future.running() and not future.set_running_or_notify_cancel():
        return
    if frame.type == "error":
        error = _error_of(frame)
        if source is not None and isinstance(error, errors.RemoteError):
            error.traceback = fill_sources(error.traceback, source)
        future.set_exception(error)
        return
    try:
        future.set_result(_result_value(frame))
    except Exception as exc:
        future.set_exception(exc)


def _result_value(frame: wire.Frame) -> Any:
    result = wire.read_result(frame)
    if result.fields is not None:
        return result.fields
    if result.unpicklable is not None:
        return RemoteValue(result.mime or {}, reason=result.unpicklable)
    try:
        value = wire.loads(result.buffers)
    except Exception as exc:
        raise errors.PicklingError(
            f"The server's answer could not be unpickled here ({type(exc).__name__}: {exc}); "
            "install the same packages on both sides, or send plain data") from None
    if result.mime is not None:
        return RemoteValue(result.mime, value=value)
    return value


_ERRORS: dict[str, Callable[[str], errors.MympsError]] = {
    wire.ERROR_PICKLE: errors.PicklingError,
    wire.ERROR_NAME: errors.RemoteNameError,
    wire.ERROR_VERSION: errors.VersionMismatchError,
    wire.ERROR_CANCELLED: errors.CancelledError,
    wire.ERROR_BAD_REQUEST: errors.BadRequestError,
}
"""The mymps error of each ``error`` frame code but ``remote``; an unknown code is a `ServerError`."""


def _error_of(frame: wire.Frame) -> errors.MympsError:
    failure = wire.read_error(frame)
    if failure.code == wire.ERROR_REMOTE:
        return _remote_error(failure.ename, failure.evalue, failure.traceback)
    return _ERRORS.get(failure.code, errors.ServerError)(failure.evalue or failure.ename)
