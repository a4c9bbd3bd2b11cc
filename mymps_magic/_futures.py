"""RemoteFuture and what a session request ends as: a value, a cell's `RemoteValue`, or a mymps error.

The session channel (``_session.py``) reads the final ``result`` or ``error`` frame of each
request; this module turns it into what the caller gets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mymps_magic import errors, wire
from mymps_magic._keptoutput import OutputFuture
from mymps_magic._pickling import fill_sources
from mymps_magic.display import RemoteValue
from mymps_magic.remote import _remote_error


class RemoteFuture(OutputFuture[Any]):
    """The outcome of a remote call; ``cancel()`` drops it from the server's queue if it has
    not started, and returns False once it runs, as ``concurrent.futures`` does.

    The output of a submitted call shows under the cell that submitted it, as it comes, and stays
    in the future: ``outputs`` and ``display_outputs(wait)`` (in a later cell, say) show it again.

    Args:
        request_id: the session request it waits for.
        withdraw: asks the server to drop a request that has not started and, if it did, stops
            waiting for it; True then. Handed in by the session channel, which makes the future,
            so this module never calls back into the channel's.
        pull: one name's value from the session namespace, for a cell's `RemoteValue` to fetch
            the object it shows; handed in by the channel as ``withdraw`` is.
    """

    def __init__(self, request_id: int, withdraw: Callable[[int], bool], pull: Callable[[str], Any]) -> None:
        super().__init__()
        self.request_id = request_id
        self.job_id: str | None = None
        self._withdraw = withdraw
        self.pull = pull

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
        future.set_result(_result_value(frame, future.pull))
    except Exception as exc:
        future.set_exception(exc)


def _result_value(frame: wire.Frame, pull: Callable[[str], Any]) -> Any:
    """A plain value, or a cell's `RemoteValue`: with the value where it is plain data (the server
    decides), else only its repr and the name it is kept under remotely, which ``fetch()`` pulls."""
    result = wire.read_result(frame)
    if result.fields is not None:
        return result.fields
    if result.kept is not None:
        return RemoteValue(result.mime or {}, reason=result.kept, handle=result.handle or "", pull=pull)
    try:
        value = wire.loads(result.buffers)
    except Exception as exc:
        raise errors.PicklingError(
            f"The server's answer could not be unpickled here ({type(exc).__name__}: {exc}); "
            "install the same packages on both sides, or send plain data") from None
    if result.mime is not None:
        return RemoteValue(result.mime, value=value, handle=result.handle or "", pull=pull)
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
