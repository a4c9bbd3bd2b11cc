"""`SessionExecution`: the part of a `Client` that runs code remotely over ``/ws/session``.

It holds the session channel, opened on first use by whichever thread asks first. The
session's namespace lives on the server and survives reconnects; ``reset`` clears it, never the
models. `Client` declares the public methods (and their promises) and delegates here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mymps_magic import errors
from mymps_magic._cellfuture import CellFuture
from mymps_magic._futures import RemoteFuture
from mymps_magic._pickling import pickle_call, pickle_values
from mymps_magic._session import SessionChannel
from mymps_magic.display import OutputSink, RemoteValue

if TYPE_CHECKING:
    from mymps_magic._connection import Connection
    from mymps_magic._reader import Request


class SessionExecution:
    """Run, submit, push, pull and cells of one client, on its one session channel.

    Args:
        connection: the client's transport, which the channel opens its WebSocket through.
    """

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self.channel: SessionChannel | None = None
        """The channel once opened; None before the first session call and after `close`."""
        # Per instance: one lock shared by every client would make each wait on another's connect.
        self._channel_lock = threading.Lock()

    @property
    def session(self) -> SessionChannel:
        """The session channel, connected on first use (once, however many threads ask)."""
        channel = self.channel
        if channel is None:
            with self._channel_lock:
                if self.channel is None:
                    self.channel = SessionChannel(self._connection, OutputSink())
                channel = self.channel
        return channel

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def _pickled_call(self, fn: Callable[..., Any], args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        """The ``run`` request's fields and buffers, refused before pickling when the two ends'
        Python or cloudpickle versions differ (the pickle would not load there)."""
        channel = self.session
        if channel.mismatch:
            raise errors.VersionMismatchError(channel.mismatch)
        return pickle_call(fn, args, kwargs)

    def run(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        fields, buffers = self._pickled_call(fn, args, kwargs)
        return self.session.call("run", fields, buffers, source=fn)

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> RemoteFuture:
        fields, buffers = self._pickled_call(fn, args, kwargs)
        return self.session.request("run", {**fields, "notify_start": True}, buffers, waiter=False, source=fn).future

    def push(self, values: dict[str, Any]) -> None:
        self.session.call("push", buffers=pickle_values(values))

    def pull(self, names: tuple[str, ...]) -> Any:
        if not names:
            raise errors.BadRequestError("pull needs at least one name, e.g. c.pull('x')")
        values = self.session.call("pull", {"names": list(names)})
        return values[0] if len(names) == 1 else values

    def run_cell(self, source: str, timeout: float | None) -> Any:
        result = self.run_cell_rich(source, timeout)
        return result.value if result is not None and result.arrived else result

    def run_cell_rich(self, source: str, timeout: float | None) -> RemoteValue | None:
        result = self.session.call("cell", {"source": source}, timeout=timeout)
        return result if isinstance(result, RemoteValue) else None

    def submit_cell(self, source: str, timeout: float | None) -> CellFuture:
        channel = self.session
        request = channel.request("cell", {"source": source})  # sent now: later cells queue behind it
        future = CellFuture(request.frame.id)
        request.keep(future.kept)  # before anyone waits for it: only the waiter renders its output
        future.set_running_or_notify_cancel()
        threading.Thread(target=self._finish_cell, args=(channel, request, future, timeout),
                         name=f"mymps-cell-{request.frame.id}", daemon=True).start()
        return future

    def _finish_cell(self, channel: SessionChannel, request: Request, future: CellFuture,
                     timeout: float | None) -> None:
        """On a thread of its own: wait for a submitted cell as a blocking cell would, its output
        kept in the future instead of shown under whichever cell runs now."""
        try:
            result = channel.wait(request, timeout)
        except Exception as exc:
            future.set_exception(exc)
            return
        future.set_result(result if isinstance(result, RemoteValue) else None)

    def interrupt(self, jobs: Callable[[], list[dict[str, Any]]]) -> bool:
        channel = self.channel
        if channel is None:
            return False  # no session yet: nothing of it can run
        busy = any(job.get("session") == channel.session_id for job in jobs())
        # Sent either way: a request still on its way to the server is not among its jobs yet,
        # and the interrupt, sent after it, reaches it there.
        channel.interrupt()
        return busy

    def reset(self) -> None:
        self.session.acknowledge_loss()
        self.session.call("reset")
