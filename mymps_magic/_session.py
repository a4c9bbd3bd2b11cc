"""The client end of ``/ws/session``: one WebSocket, many requests in flight, and reconnection.

A reader thread receives every frame and hands it to the request it belongs to. A blocking call
(``run``, ``run_cell``, ``push``, ``pull``) waits on its own thread and renders its request's
output there, so in a Jupyter kernel the output lands in the cell that asked for it; output of
``submit``ted calls is rendered by the reader thread.

When the connection breaks, the reader reconnects with the session id and the last sequence
number it saw: the server replays what was missed and the client resends the requests the
server never got. Nothing in flight is lost, and the remote namespace survives.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import queue
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from mymps_magic import errors, wire
from mymps_magic.display import OutputSink, RemoteValue

if TYPE_CHECKING:
    from mymps_magic._connection import Connection

RECONNECT_WINDOW = 60.0
"""Seconds the client keeps trying to reconnect before the calls in flight fail."""

RECV_BUFSIZE = 1 << 20
"""Bytes read from the socket at once: websockets' 64 KiB costs a third of a large pull's speed."""

_WAIT_STEP_S = 0.2
_ACK_LARGE = 1 << 20
_ACK_EVERY = 256
"""Frames received without a request to carry their ack, before an ack frame of its own (it
bounds what the server keeps for a replay)."""
_BACKOFF = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
_OUTPUT = frozenset({"stream", "display", "progress"})


class RemoteFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """The outcome of a remote call; ``cancel()`` drops it from the server's queue if it has
    not started, and returns False once it runs, as ``concurrent.futures`` does."""

    def __init__(self, channel: SessionChannel, request_id: int) -> None:
        super().__init__()
        self._channel = channel
        self.request_id = request_id
        self.job_id: str | None = None

    def cancel(self) -> bool:
        if self.done():
            return self.cancelled()
        if self.running() or not self._channel.cancel_queued(self.request_id):
            return False
        self._channel.forget(self.request_id)
        return super().cancel()


class _Request:
    def __init__(self, frame: wire.Frame, future: RemoteFuture, waiter: bool) -> None:
        self.frame = frame
        self.future = future
        # A blocking caller renders its own output; None means the reader thread renders it.
        self.events: queue.SimpleQueue[wire.Frame | None] | None = queue.SimpleQueue() if waiter else None


class SessionChannel:
    """One session with the server, over one WebSocket that is reopened when it breaks."""

    def __init__(self, connection: Connection, sink: OutputSink) -> None:
        self.connection = connection
        self.sink = sink
        self.session_id: str | None = None
        self.welcome: wire.Frame | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, _Request] = {}
        self._lock = threading.Lock()
        self._last_seq = 0
        self._acked = 0
        self._ws: Any = None
        self._send_lock = threading.Lock()  # a chunked frame's messages must not interleave with another's
        self._closed = False
        self._connect()
        self._reader = threading.Thread(target=self._read_forever, name="mymps-session", daemon=True)
        self._reader.start()

    # -- connecting ------------------------------------------------------------------------------

    def _connect(self) -> None:
        """Open the socket and say hello; resend what the server did not get."""
        from websockets.sync.client import connect

        with self.connection.ws_errors():
            ws = connect(
                self.connection.ws_url("/ws/session"),
                additional_headers=self.connection.headers,
                max_size=None,
                open_timeout=5,
                proxy=None,
                compression=None,
                legacy=True,  # a long-lived connection, closed by close(), not a with-block
            )
            ws.recv_bufsize = RECV_BUFSIZE
            hello = wire.Frame("hello", 0, {
                "session": self.session_id, "last_seq": self._last_seq, "python": wire.PYTHON_VERSION,
                "cloudpickle": wire.cloudpickle_version(), "protocol": wire.PROTOCOL_VERSION,
            })
            with self._send_lock:
                for message in wire.encode_frame(hello):
                    ws.send(message)
            welcome = wire.FrameDecoder().feed(ws.recv())
        if welcome is None or welcome.type != "welcome":
            ws.close()
            raise errors.ServerError("The server did not answer the session hello; is it a mymps server of the same version?")
        lost = self.session_id is not None and not welcome["resumed"]
        if lost:
            self._fail_all(errors.SessionLostError(
                "The server no longer has this session (it restarted, or the session idled out): "
                "the remote namespace is gone. Push your data and run your cells again."))
            self._last_seq = 0
        if self.welcome is None and welcome.get("mismatch"):
            print(f"mymps: {welcome['mismatch']}", file=sys.stderr)
        self.welcome, self.session_id = welcome, welcome["session"]
        self._acked = self._last_seq
        with self._send_lock:  # no new request slips in before the resent ones: ids stay in order
            self._ws = ws
            with self._lock:
                resend = [r for rid, r in sorted(self._pending.items()) if rid > int(welcome.get("last_request") or 0)]
            for request in resend:
                self._send_locked(request.frame)

    def _reconnect(self) -> bool:
        deadline = time.monotonic() + RECONNECT_WINDOW
        for attempt in itertools.count():
            if self._closed:
                return False
            try:
                self._connect()
                return True
            except errors.AuthError as exc:
                self._fail_all(exc)
                return False
            except errors.MympsError:
                if time.monotonic() > deadline:
                    break
                time.sleep(_BACKOFF[min(attempt, len(_BACKOFF) - 1)])
        self._fail_all(errors.ConnectionError(
            f"Lost the session with {self.connection.settings.address} and could not reconnect within "
            f"{RECONNECT_WINDOW:g} s. Is the tunnel up (`mymps tunnel`) and the server running (`mymps serve`)?"))
        return False

    @property
    def mismatch(self) -> str | None:
        return None if self.welcome is None else self.welcome.get("mismatch")

    # -- requests --------------------------------------------------------------------------------

    def request(self, kind: str, fields: dict[str, Any] | None = None, buffers: list[Any] | None = None,
                *, waiter: bool = True) -> _Request:
        # Ids are taken and frames sent under one lock: the server relies on ids arriving in
        # order to tell a resent request (after a reconnect) from a new one.
        with self._send_lock:
            rid = next(self._ids)
            # Every request tells the server what has arrived, so it can forget it: no ack frame
            # of its own on the way of a quick call.
            self._acked = self._last_seq
            frame = wire.Frame(kind, rid, {**(fields or {}), "ack": self._acked}, buffers or [])
            request = _Request(frame, RemoteFuture(self, rid), waiter)
            with self._lock:
                self._pending[rid] = request
            self._send_locked(frame)
        return request

    def _send(self, frame: wire.Frame) -> None:
        with self._send_lock:
            self._send_locked(frame)

    def _send_locked(self, frame: wire.Frame) -> None:
        """Send now if connected (the caller holds the send lock); otherwise the reconnect resends it."""
        ws = self._ws
        if ws is None:
            return
        try:
            for message in wire.encode_frame(frame):
                ws.send(message)
        except Exception:  # the reader sees the broken socket too, and reconnects
            pass

    def wait(self, request: _Request, timeout: float | None = None) -> Any:
        """Block until the request ends, rendering its output on this thread.

        A first Ctrl-C (the notebook's stop button) interrupts the remote code and keeps waiting
        for it to stop; a second one stops waiting. ``timeout`` interrupts the remote code when
        it runs over.
        """
        assert request.events is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        interrupted = False
        while True:
            try:
                # Short steps, never one long block: a Ctrl-C that lands just before a blocking
                # get would otherwise wait for the next event to be noticed.
                step = _WAIT_STEP_S if deadline is None or interrupted else min(
                    _WAIT_STEP_S, max(0.0, deadline - time.monotonic()))
                try:
                    event = request.events.get(timeout=step)
                except queue.Empty:
                    if deadline is not None and not interrupted and time.monotonic() >= deadline:
                        self.interrupt(request.frame.id)
                        interrupted = True
                    continue
                if event is None:
                    break
                self._render(request.frame.id, event)
            except KeyboardInterrupt:
                if interrupted:
                    raise
                self.interrupt(request.frame.id)
                interrupted = True
        self.sink.finish(request.frame.id)
        return request.future.result()

    def call(self, kind: str, fields: dict[str, Any] | None = None, buffers: list[Any] | None = None,
             timeout: float | None = None) -> Any:
        return self.wait(self.request(kind, fields, buffers), timeout)

    def interrupt(self, target: int = 0) -> None:
        self.request("interrupt", {"target": target}, waiter=False)

    def cancel_queued(self, target: int) -> bool:
        """Ask the server to drop a queued request; True if it never ran."""
        request = self.request("cancel", {"target": target}, waiter=False)
        try:
            answer = request.future.result(timeout=10)
        except (concurrent.futures.TimeoutError, errors.MympsError):
            return False
        return bool(answer.get("cancelled"))

    def forget(self, rid: int) -> None:
        with self._lock:
            request = self._pending.pop(rid, None)
        if request is not None and request.events is not None:
            request.events.put(None)

    # -- receiving -------------------------------------------------------------------------------

    def _read_forever(self) -> None:
        decoder = wire.FrameDecoder()
        while not self._closed:
            try:
                frame = decoder.feed(self._ws.recv())
            except Exception:
                if self._closed or not self._reconnect():
                    return
                decoder = wire.FrameDecoder()
                continue
            if frame is not None:
                self._dispatch(frame)

    def _dispatch(self, frame: wire.Frame) -> None:
        seq = int(frame.get("seq") or 0)
        if seq and seq <= self._last_seq:
            return  # already seen before the connection dropped
        self._last_seq = max(self._last_seq, seq)
        with self._lock:
            request = self._pending.get(frame.id)
        if request is None:
            return
        if frame.type in _OUTPUT:
            if request.events is not None:
                request.events.put(frame)
            else:
                self._render(frame.id, frame)
            return
        if frame.type == "started":
            request.future.job_id = frame.get("job")
            request.future.set_running_or_notify_cancel()
            return
        with self._lock:
            self._pending.pop(frame.id, None)
        _settle(request.future, frame)
        if request.events is not None:
            request.events.put(None)
        large = sum(memoryview(b).nbytes for b in frame.buffers) >= _ACK_LARGE
        # Acked at once: after many frames, or a large value the server should not keep for a
        # replay; otherwise the next request carries the ack.
        if large or self._last_seq - self._acked >= _ACK_EVERY:
            self._acked = self._last_seq
            self._send(wire.Frame("ack", 0, {"seq": self._last_seq}))

    def _render(self, rid: int, frame: wire.Frame) -> None:
        if frame.type == "stream":
            self.sink.stream(frame["name"], frame["text"])
        elif frame.type == "display":
            self.sink.display(frame["data"], frame.get("metadata"))
        else:
            self.sink.progress(rid, frame.fields)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for request in pending.values():
            if not request.future.done():
                if not request.future.running():
                    request.future.set_running_or_notify_cancel()
                request.future.set_exception(exc)
            if request.events is not None:
                request.events.put(None)

    def close(self) -> None:
        self._closed = True
        ws = self._ws
        if ws is not None:
            ws.close()
        self._fail_all(errors.ConnectionError("The client was closed."))


def _settle(future: RemoteFuture, frame: wire.Frame) -> None:
    """Complete the future from a ``result`` or ``error`` frame."""
    if future.cancelled():
        return
    if not future.running():
        if not future.set_running_or_notify_cancel():
            return
    if frame.type == "error":
        future.set_exception(_remote_error(frame))
        return
    try:
        future.set_result(_result_value(frame))
    except Exception as exc:
        future.set_exception(exc)


def _result_value(frame: wire.Frame) -> Any:
    if "fields" in frame.fields:
        return frame["fields"]
    if frame.get("unpicklable"):
        return RemoteValue(frame.get("mime") or {}, frame["unpicklable"])
    try:
        value = wire.loads(frame.buffers)
    except Exception as exc:
        raise errors.PicklingError(
            f"The server's answer could not be unpickled here ({type(exc).__name__}: {exc}); "
            "install the same packages on both sides, or send plain data") from None
    if frame.get("mime") is not None:
        return CellResult(value, frame["mime"])
    return value


class CellResult:
    """A cell's last value and the rich repr the server made of it."""

    def __init__(self, value: Any, mime: dict[str, Any]) -> None:
        self.value = value
        self.mime = mime


_ERRORS: dict[str, Callable[[str], errors.MympsError]] = {
    "pickle": errors.PicklingError,
    "name": errors.RemoteNameError,
    "version": errors.VersionMismatchError,
    "cancelled": errors.CancelledError,
    "bad_request": errors.BadRequestError,
}


def _remote_error(frame: wire.Frame) -> errors.MympsError:
    code = frame.get("code", "remote")
    if code == "remote":
        return _remote_class(str(frame["ename"]))(frame["ename"], frame.get("evalue", ""), frame.get("traceback"))
    return _ERRORS.get(code, errors.ServerError)(str(frame.get("evalue") or frame["ename"]))


@functools.lru_cache(maxsize=256)
def _remote_class(ename: str) -> type[errors.RemoteError]:
    """A `RemoteError` subclass named after the remote type, so a notebook (and nbclient, and
    papermill) reports ``ZeroDivisionError`` rather than ``RemoteError``."""
    name = ename if ename.isidentifier() else "RemoteError"
    return type(name, (errors.RemoteError,), {"__module__": "mymps_magic.remote", "__qualname__": name})
