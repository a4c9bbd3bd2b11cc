"""The reader role of the session channel: its requests in flight, and who reads the socket.

Who reads the socket: the thread that waits for an answer. A blocking call (``run``,
``run_cell``, ``push``, ``pull``) takes the socket's reader role and reads until its request
ends, rendering its own output as it comes, so in a Jupyter kernel the output lands in the cell
that asked for it and a quick call crosses no thread at all. Frames of other requests are handed
to their own waiting threads. A background thread reads only when nobody else does and something
is expected (the futures of ``submit``), and every few seconds to answer the server's pings.

The session protocol (hello, requests, acks, reconnection) is ``_session.py``'s; this module
reads through it (:class:`Channel`) and never builds a frame.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

from mymps_magic import wire
from mymps_magic._futures import RemoteFuture, settle
from mymps_magic.display import cell_parent, shown_under

if TYPE_CHECKING:
    from mymps_magic._keptoutput import KeptOutput
    from mymps_magic._websocket import ClientWebSocket
    from mymps_magic.display import OutputSink

_WAIT_STEP_S = 0.2


class Channel(Protocol):
    """What the reader needs of the session channel (``_session.SessionChannel``)."""

    sink: OutputSink  # where output nobody else renders goes; a caller may swap it

    @property
    def closed(self) -> bool: ...

    @property
    def socket(self) -> ClientWebSocket | None: ...

    @property
    def keepalive_s(self) -> float: ...

    def read_one(self, timeout: float | None) -> bool:
        """Read and dispatch one message if one comes within ``timeout``; False when the session
        is closed or could not be reopened."""

    def reconnect(self) -> bool: ...

    def interrupt(self, target: int = 0) -> None: ...


class Request:
    """One request in flight: its frame (resent after a reconnect), its future and its output.

    Where its output goes: a blocking caller renders it on its own thread, in its own cell. That
    of a request nobody waits for (``submit``) is rendered by whichever thread reads, under the
    cell that sent it (``parent``), and kept in its future (``kept``) as well.
    """

    def __init__(self, frame: wire.Frame, future: RemoteFuture, waiter: bool, source: Any = None) -> None:
        self.frame = frame
        self.future = future
        self.source = source  # the function a `run` sends, whose source lines its traceback lacks
        # A blocking caller renders its own output; None means whoever reads renders it.
        self.events: collections.deque[wire.Frame] | None = collections.deque() if waiter else None
        self.kept: KeptOutput | None = None if waiter else future.kept
        self.shown = True
        self.parent = None if waiter else cell_parent()  # read on the sending thread: its cell

    def keep(self, kept: KeptOutput) -> None:
        """Keep the output in ``kept`` instead of showing it (a ``--noblock`` cell's; call it
        before anyone waits for the request)."""
        self.kept, self.shown = kept, False


class Reader:
    """The pending requests and the reader role, under one lock: who reads the socket now
    (`_reader`, a thread id), how many callers wait for it or for their events (`_callers`),
    and how many pending requests nobody waits on (`unwatched`)."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._lock = threading.Lock()
        self._role = threading.Condition(self._lock)
        self._pending: dict[int, Request] = {}
        self._reader: int | None = None
        self._callers = 0
        self.unwatched = 0
        self._wake_r, self._wake_w = socket.socketpair()  # pokes the background reader out of its wait
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._background = threading.Thread(target=self._read_in_background, name="mymps-session", daemon=True)

    def start(self) -> None:
        """Start the background reader (once the channel is connected)."""
        self._background.start()

    # -- the pending requests ----------------------------------------------------------------------

    def __bool__(self) -> bool:
        return bool(self._pending)

    def add(self, request: Request) -> None:
        with self._lock:
            self._pending[request.frame.id] = request
            if request.events is None:
                self.unwatched += 1
                self._role.notify_all()  # the background reader has something to wait for

    def above(self, last_request: int) -> list[Request]:
        """The pending requests above ``last_request``, in order: what the server never got."""
        with self._lock:
            return [r for rid, r in sorted(self._pending.items()) if rid > last_request]

    def get(self, rid: int, final: bool) -> Request | None:
        """The request a frame belongs to; a ``final`` frame ends it (it is no longer pending)."""
        with self._lock:
            request = self._pending.get(rid)
            if request is not None and final:
                del self._pending[rid]
                if request.events is None:
                    self.unwatched -= 1
            return request

    def remove(self, rid: int) -> bool:
        """Forget a request that ends without an answer; wakes whoever waits. True if it was there."""
        with self._role:
            request = self._pending.pop(rid, None)
            if request is not None and request.events is None:
                self.unwatched -= 1
            self._role.notify_all()
        return request is not None

    def take_all(self) -> list[Request]:
        """Forget every pending request (they are about to fail); call `notify_all` after."""
        with self._role:
            pending, self._pending = self._pending, {}
            self.unwatched = 0
        return list(pending.values())

    def deliver(self, frame: wire.Frame) -> None:
        """Hand a frame to its request: output to the thread that waits for it (or ``render`` it
        now, on the reading thread, when nobody waits), its end to its future."""
        final = frame.type not in wire.OUTPUT_FRAMES and frame.type != "started"
        request = self.get(frame.id, final)
        if request is None:
            return
        if frame.type in wire.OUTPUT_FRAMES:
            events = request.events
            if events is None:  # nobody waits for it: shown from whichever thread reads
                self._render_unwatched(request, frame)
            else:
                events.append(frame)
                self.notify_callers()
            return
        if frame.type == "started":
            request.future.job_id = wire.read_started(frame)
            request.future.set_running_or_notify_cancel()
            return
        if request.events is None:
            self._render_unwatched(request, None)  # closes the bars it left open
        settle(request.future, frame, request.source)
        if request.events is not None:
            self.notify_callers()

    def refuse(self, request: Request, exc: BaseException) -> None:
        """End one pending request with ``exc`` (the server refused it without an answer)."""
        self.remove(request.frame.id)
        _fail(request, exc)

    def fail_all(self, exc: BaseException) -> None:
        for request in self.take_all():
            _fail(request, exc)
        self.notify_all()

    def notify_all(self) -> None:
        with self._role:
            self._role.notify_all()

    def notify_callers(self) -> None:
        with self._role:
            if self._callers:
                self._role.notify_all()

    # -- the reader role ---------------------------------------------------------------------------

    def wait(self, request: Request, timeout: float | None = None) -> Any:
        """Block until the request ends, rendering its output on this thread.

        A first Ctrl-C (the notebook's stop button) interrupts the remote code and keeps waiting
        for it to stop; a second one stops waiting. ``timeout`` interrupts the remote code when
        it runs over.
        """
        assert request.events is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        interrupted = False
        me = threading.get_ident()
        try:
            while True:
                try:
                    if self._render_events(request):
                        break
                    # Short steps, never one long block: a timeout must be noticed in time.
                    step = _WAIT_STEP_S if deadline is None or interrupted else min(
                        _WAIT_STEP_S, max(0.0, deadline - time.monotonic()))
                    if self._take_role(me, request, step):
                        # Without a deadline, block in the read itself: no wait for readiness first.
                        self._channel.read_one(None if deadline is None and not interrupted else step)
                    if deadline is not None and not interrupted and time.monotonic() >= deadline:
                        self._channel.interrupt(request.frame.id)
                        interrupted = True
                except KeyboardInterrupt:
                    if interrupted:
                        raise
                    self._channel.interrupt(request.frame.id)
                    interrupted = True
        finally:
            self._release_role(me, request)
        self._channel.sink.finish(request.frame.id)
        return request.future.result()

    def _read_in_background(self) -> None:
        me = threading.get_ident()
        try:
            while self._await_turn(me):
                try:
                    self._read_while_needed()
                finally:
                    self._release_role(me)
        finally:
            self.close()

    def _read_while_needed(self) -> None:
        """Read until a caller wants the socket and nothing unwatched is pending, or nothing
        more is there to read."""
        while not self._channel.closed:
            ws = self._channel.socket
            if ws is None or ws.closed:
                if not self._channel.reconnect():
                    return
                continue
            try:
                ready = ws.wait_readable(None if self.unwatched else 0, self.wake_fileno)
            except (OSError, ValueError):
                if not self._channel.reconnect():
                    return
                continue
            if self.wake_fileno in ready:
                self.drain()
                return  # a caller wants the socket
            if not ready:
                return
            if not self._channel.read_one(0):
                return

    def _render_events(self, request: Request) -> bool:
        """Render what arrived for a waiting request; True once it has ended. (Whether it ended
        is read first: its events all arrive before its end.)"""
        done = request.future.done()
        events = request.events
        while events:
            self._render(request, events.popleft())
        return done

    def _render_unwatched(self, request: Request, frame: wire.Frame | None) -> None:
        """Render an output frame (None: the request's end) of a request nobody waits for, on
        whichever thread reads, under the cell that sent it."""
        try:
            if request.parent is None:
                self._render(request, frame)
            else:
                with shown_under(request.parent):
                    self._render(request, frame)
        except Exception as exc:  # never the reader's problem, whoever it is
            print(f"mymps: could not show the output of request {request.frame.id}: {exc}", file=sys.stderr)

    def _render(self, request: Request, frame: wire.Frame | None) -> None:
        rid, sink, kept = request.frame.id, self._channel.sink, request.kept
        if frame is None:
            sink.finish(rid)
            return
        output = wire.read_output(frame)
        if output.kind == "stream":
            if kept is not None:
                kept.stream(output.name, output.text)
            if request.shown:
                sink.stream(output.name, output.text, rid)
        elif output.kind == "display":
            if kept is not None:
                kept.display(output.data, output.metadata)
            if request.shown:
                sink.display(output.data, output.metadata, rid)
        elif request.shown:
            sink.progress(rid, output.data)

    def _take_role(self, me: int, request: Request, timeout: float) -> bool:
        """Become the socket's reader; or, while another thread reads, wait (up to ``timeout``)
        for it to hand over or to pass this request an event. True when this thread may read."""
        with self._role:
            # Whoever read before may have ended this request already (it settles the future
            # before it hands the role back): then there is nothing left to read for it.
            if request.events or request.future.done():
                return False
            if self._reader is None or self._reader == me:
                self._reader = me
                return True
            if self._reader == self._background.ident:
                self.poke()
            self._callers += 1
            try:
                self._role.wait(timeout)
            finally:
                self._callers -= 1
            if self._reader is None and not request.events and not request.future.done():
                self._reader = me
                return True
            return False

    def _release_role(self, me: int, request: Request | None = None) -> None:
        with self._role:
            if request is not None and not request.future.done() and request.events is not None:
                request.events = None  # the caller stopped waiting (a second Ctrl-C): whoever reads renders it
                request.parent = cell_parent()  # still under the caller's cell
                self.unwatched += 1
            if self._reader == me:
                self._reader = None
                if self._callers or self.unwatched:
                    self._role.notify_all()

    def _await_turn(self, me: int) -> bool:
        """Wait until the socket is free and something is expected, or the keepalive is due;
        then take the reader role. False once the channel is closed."""
        with self._role:
            keepalive_s = self._channel.keepalive_s
            deadline = time.monotonic() + keepalive_s
            while not self._channel.closed:
                free = self._reader is None and not self._callers
                left = deadline - time.monotonic()
                if free and (self.unwatched or left <= 0):
                    self._reader = me
                    return True
                self._role.wait(left if left > 0 else keepalive_s)
            return False

    # -- waking the background reader --------------------------------------------------------------

    @property
    def wake_fileno(self) -> int:
        return self._wake_r.fileno()

    def poke(self) -> None:
        with contextlib.suppress(OSError):  # its buffer is full (it is poked already) or it is closed
            self._wake_w.send(b"!")

    def drain(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self._wake_r.close()
        self._wake_w.close()


def _fail(request: Request, exc: BaseException) -> None:
    if not request.future.done():
        if not request.future.running():
            request.future.set_running_or_notify_cancel()
        request.future.set_exception(exc)
