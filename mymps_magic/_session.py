"""The client end of ``/ws/session``: one WebSocket, many requests in flight, and reconnection.

Who reads the socket: the thread that waits for an answer. A blocking call (``run``,
``run_cell``, ``push``, ``pull``) takes the socket's reader role and reads until its request
ends, rendering its own output as it comes, so in a Jupyter kernel the output lands in the cell
that asked for it and a quick call crosses no thread at all. Frames of other requests are handed
to their own waiting threads. A background thread reads only when nobody else does and something
is expected (the futures of ``submit``), and every few seconds to answer the server's pings.

When the connection breaks, the reader reconnects with the session id and the last sequence
number it saw: the server replays what was missed and the client resends the requests the
server never got. Nothing in flight is lost, and the remote namespace survives.

When the session cannot go on, the channel says so on every call until the user acknowledges it
(``reset()``, ``%mymps reset``, or a new `Client`), so that code never runs in an empty namespace
by surprise (the error is kept in ``_lost``):

- The server answers a reconnect without the session (it restarted, or the session idled out):
  `SessionLostError`. The channel is connected again, to a fresh session.
- The socket broke while calls were in flight and, for `GONE_AFTER_S` seconds since, every
  reconnect was refused or closed before any HTTP answer: `ServerGoneError`, "the server process
  ended while running this call". The client cannot see the other end of the tunnel, so this is
  the rule that tells a crash (user code calling ``os._exit``, a segfault) from a dropped link:
  a link that drops comes back within seconds (`mymps tunnel` reopens it at once), a crashed
  server does not come back by itself. The calls in flight fail with it, but the session is not
  given up: each later call first tries once to resume it. If the link comes back with the
  session there (a link down for longer than `GONE_AFTER_S`, not a crash), the call runs in the
  kept namespace and only the answers of the failed calls are lost; if a restarted server no
  longer has it, that is `SessionLostError`; if nothing answers yet, the call fails at once with
  the same `ServerGoneError`. With nothing in flight the client keeps trying for
  `RECONNECT_WINDOW` seconds, as before.
- The server closes the socket with a reason that would come again on every reconnect (a
  protocol mismatch, a session taken over by another connection, any close code that is not a
  lost link): `ClosedError` with the server's reason, and no reconnect. A new attempt would only
  repeat it, or, for a session taken over, take it back and start a tug of war.
- One close is not repeated: 1009, a request over ``--max-body``. The server read every request
  before that one (its welcome's ``last_request`` says which), so the first request after them
  fails with `BadRequestError`, as an upload over the limit does, the others are resent, and
  the session goes on.
"""

from __future__ import annotations

import concurrent.futures
import copy
import itertools
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from mymps_magic import errors, wire
from mymps_magic._connection import WS_CLOSE_TOO_BIG
from mymps_magic._futures import RemoteFuture
from mymps_magic._reader import Reader, Request
from mymps_magic._websocket import ClientWebSocket, Closed, MessageTooBig
from mymps_magic.display import OutputSink

if TYPE_CHECKING:
    from mymps_magic._connection import Connection

RECONNECT_WINDOW = 60.0
"""Seconds the client keeps trying to reconnect before the calls in flight fail."""

GONE_AFTER_S = 5.0
"""Seconds of refused or unanswered reconnects, with calls in flight, after which the server
process is taken to have ended (see the module docstring)."""

CONNECT_TIMEOUT = 5.0
KEEPALIVE_S = 5.0
"""Longest the socket goes unread while idle: the server's pings (every 20 s) want an answer."""

_ACK_LARGE = 1 << 20
_ACK_EVERY = 256
"""Bytes and frames received without a request to carry their ack, before an ack frame of its
own: they bound what the server keeps for a replay (far below its ``--session-buffer``)."""
_BACKOFF = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class SessionChannel:
    """One session with the server, over one WebSocket that is reopened when it breaks."""

    def __init__(self, connection: Connection, sink: OutputSink) -> None:
        self.connection = connection
        self.sink = sink
        self.session_id: str | None = None
        self.welcome: wire.Welcome | None = None
        self._ids = itertools.count(1)
        self._reader = Reader(self)
        self._last_seq = 0
        self._acked = 0
        self._unacked_bytes = 0  # received since the last ack: the server keeps them till then
        self._ack_bytes = _ACK_LARGE  # at most a quarter of the server's --session-buffer (welcome)
        self._ws: ClientWebSocket | None = None
        self._decoder = wire.FrameDecoder()
        self._send_lock = threading.Lock()  # a chunked frame's messages must not interleave with another's
        self._closed = False
        self._lost: errors.MympsError | None = None  # raised by every call until acknowledged
        self._halted = False  # no reconnect until acknowledged: the server is gone or said no
        self._resume_lock = threading.Lock()  # one caller at a time tries to resume after a crash
        self._too_big: str | None = None  # the reason of a 1009 close, for the request it refused
        self._connect_first()
        self._reader.start()

    def _connect_first(self) -> None:
        """The first connection, tried again for a few seconds when the link took it and then
        dropped it (a tunnel cut at that moment), as a later reconnect would be; a port nobody
        listens on, or no answer within the connect timeout, fails at once."""
        for delay in (*_BACKOFF, None):
            try:
                self._connect()
                return
            except (errors.ClosedError, errors.SessionLostError):
                raise
            except errors.ConnectionError as exc:
                if delay is None or isinstance(exc.__context__, (ConnectionRefusedError, TimeoutError)):
                    raise
                time.sleep(delay)

    # -- connecting ------------------------------------------------------------------------------

    def _connect(self) -> None:
        """Open the socket and say hello; resend what the server did not get."""
        settings = self.connection.settings
        hello = wire.hello(self.session_id, self._last_seq)
        with self.connection.ws_errors():
            ws = ClientWebSocket.connect(settings.host, settings.port, "/ws/session", self.connection.headers,
                                         timeout=CONNECT_TIMEOUT)
            try:
                for message in wire.encode_frame(hello):
                    ws.send(message)
                answer = wire.FrameDecoder().feed(ws.recv()[0])
                ws.sock.settimeout(None)
            except BaseException:
                ws.close()
                raise
        try:
            welcome = wire.read_welcome(answer)
        except wire.WireFormatError:
            ws.close()
            raise errors.ServerError("The server did not answer the session hello; is it a mymps server of the "
                                     "same version?") from None
        lost = self.session_id is not None and not welcome.resumed
        if lost:
            self._lost = errors.SessionLostError(self._lost_message())
            self._reader.fail_all(self._lost)
            self._last_seq = 0
        if self.welcome is None and welcome.mismatch:
            print(f"mymps: {welcome.mismatch}", file=sys.stderr)
        self.welcome, self.session_id = welcome, welcome.session
        buffer = welcome.session_buffer
        self._ack_bytes = _ACK_LARGE if buffer is None else min(_ACK_LARGE, buffer // 4)
        self._acked = self._last_seq
        self._decoder = wire.FrameDecoder()
        with self._send_lock:  # no new request slips in before the resent ones: ids stay in order
            self._ws = ws
            resend = self._reader.above(welcome.last_request)
            if self._too_big is not None and resend:
                refused, resend = resend[0], resend[1:]
                self._reader.refuse(refused, errors.BadRequestError(self._too_big, status_code=413))
            self._too_big = None
            for request in resend:
                self._send_locked(request.frame)

    def _lost_message(self) -> str:
        """Why the session is gone, in one line: the crash ``mymps serve`` restarted the server
        after, when its ``/health`` names one (``last_crash``)."""
        try:
            health = self.connection.json("GET", "/health")
        except errors.MympsError:
            health = {}
        crash = health.get("last_crash")
        why = (f"it was started again {health.get('uptime_s', '?')} s ago, after {crash}" if crash
               else "it restarted, or the session idled out")
        return (f"The server no longer has this session ({why}): the remote namespace is gone. Call reset() "
                "(`%mymps reset`) to go on in a fresh one, and push your data again.")

    def reconnect(self) -> bool:
        """Reopen the session (the reader role's holder does this); False once it gave up."""
        self._drop(self._ws)
        started = time.monotonic()
        in_flight = bool(self._reader)
        for attempt in itertools.count():
            if self._closed or self._halted:
                return False
            try:
                self._connect()
                return True
            except errors.AuthError as exc:
                self._reader.fail_all(exc)
                return False
            except errors.ClosedError as exc:  # it would say the same again
                self._halt(exc)
                return False
            except errors.MympsError:
                waited = time.monotonic() - started
                if waited > RECONNECT_WINDOW:
                    break
                if in_flight and waited > GONE_AFTER_S:
                    self._halt(errors.ServerGoneError(
                        f"The server process at {self.connection.settings.address} ended while running this call "
                        "(user code that calls os._exit or crashes ends it; nothing has answered there for "
                        f"{GONE_AFTER_S:g} s). `mymps serve` starts it again by itself, else start it with "
                        "`mymps serve --restore` (the models come back, the namespace does not); then call reset() "
                        "(`%mymps reset`). If the tunnel was down instead, the next call resumes the session."))
                    return False
                time.sleep(_BACKOFF[min(attempt, len(_BACKOFF) - 1)])
        self._reader.fail_all(errors.ConnectionError(
            f"Lost the session with {self.connection.settings.address} and could not reconnect within "
            f"{RECONNECT_WINDOW:g} s. Is the tunnel up (`mymps tunnel`) and the server running (`mymps serve`)?"))
        return False

    def _closed_by_server(self, closed: Closed) -> bool:
        """The server closed the socket; reconnect unless the close would come again."""
        if closed.code == WS_CLOSE_TOO_BIG:
            reason = closed.reason or "message too big"
            self._too_big = (f"The server refused a request over its --max-body ({reason}). "
                             "Send less at once, or start the server with a larger --max-body.")
            return self.reconnect()
        error = self.connection.closed_error(closed.code, closed.reason)
        if isinstance(error, (errors.ClosedError, errors.AuthError)):
            self._drop(self._ws)
            self._halt(error)
            return False
        return self.reconnect()

    def _halt(self, error: errors.MympsError) -> None:
        """Stop reconnecting: every call fails with ``error`` until `acknowledge_loss`."""
        self._halted = True
        self._lost = error
        self._reader.fail_all(error)

    def acknowledge_loss(self) -> None:
        """The user knows the session is gone (``reset()``): calls run again, and a channel that
        stopped reconnecting opens a fresh session on the next call."""
        with self._send_lock:
            self._lost = None
            if self._halted:
                self._halted = False
                self.session_id = None
                self._last_seq = 0

    def _try_resume(self) -> None:
        """After `ServerGoneError`: one attempt to resume the session, for a link that was down
        rather than a server that ended. Resumed: calls run again in the kept namespace. Not
        resumed (a restarted server): `_connect` says `SessionLostError`. No answer: it stays."""
        with self._resume_lock:
            if not isinstance(self._lost, errors.ServerGoneError) or self._closed:
                return
            try:
                self._connect()
            except errors.MympsError:
                return
            self._halted = False  # connected again: to the kept session, or (SessionLostError) a fresh one
            if isinstance(self._lost, errors.ServerGoneError):
                self._lost = None

    def _drop(self, ws: ClientWebSocket | None) -> None:
        """Forget a socket that broke (or whose stream a Ctrl-C cut in the middle of a message)."""
        if ws is None:
            return
        with self._send_lock:
            if self._ws is ws:
                self._ws = None
        ws.close()

    @property
    def mismatch(self) -> str | None:
        return None if self.welcome is None else self.welcome.mismatch

    # -- requests --------------------------------------------------------------------------------

    def request(self, kind: str, fields: dict[str, Any] | None = None, buffers: list[Any] | None = None,
                *, waiter: bool = True, source: Any = None) -> Request:
        """Send one request; its future ends with the answer.

        Raises:
            SessionLostError: the session is gone and the user has not acknowledged it yet
                (`ServerGoneError` after a crash); `ClosedError` after a close that would repeat.
        """
        if isinstance(self._lost, errors.ServerGoneError):
            self._try_resume()
        lost = self._lost
        if lost is not None:
            raise copy.copy(lost)  # a fresh instance: raising one object again would stack tracebacks
        if buffers and sum(memoryview(b).nbytes for b in buffers) > wire.CHUNK:
            # Large buffers go ahead as an HTTP body (several times faster than WebSocket
            # messages); the request names them.
            fields, buffers = {**(fields or {}), "upload": self._upload(buffers)}, None
        # Ids are taken and frames sent under one lock: the server relies on ids arriving in
        # order to tell a resent request (after a reconnect) from a new one.
        with self._send_lock:
            rid = next(self._ids)
            # Every request tells the server what has arrived, so it can forget it: no ack frame
            # of its own on the way of a quick call.
            self._acked, self._unacked_bytes = self._last_seq, 0
            frame = wire.request(kind, rid, self._acked, fields, buffers)
            request = Request(frame, RemoteFuture(rid, self.withdraw, self.pull_one), waiter, source)
            self._reader.add(request)
            self._send_locked(frame)
        return request

    def _upload(self, buffers: list[Any]) -> str:
        """Send buffers as ``PUT /session/{id}/upload``; returns the id the request names.
        A connection that breaks is retried for as long as the session would reconnect."""
        parts = wire.encode_stream(wire.upload(buffers))
        deadline = time.monotonic() + RECONNECT_WINDOW
        for attempt in itertools.count():
            try:
                return str(self.connection.put_stream(f"/session/{self.session_id}/upload", parts)["upload"])
            except errors.ConnectionError:
                if self._closed or time.monotonic() > deadline:
                    raise
                time.sleep(_BACKOFF[min(attempt, len(_BACKOFF) - 1)])
        raise AssertionError("unreachable")

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
        except OSError:  # whoever reads next sees the broken socket too, and reconnects
            pass

    def call(self, kind: str, fields: dict[str, Any] | None = None, buffers: list[Any] | None = None,
             timeout: float | None = None, source: Any = None) -> Any:
        return self._reader.wait(self.request(kind, fields, buffers, source=source), timeout)

    def wait(self, request: Request, timeout: float | None = None) -> Any:
        """Block until a request (sent with ``waiter=True``) ends, rendering its output on this thread."""
        return self._reader.wait(request, timeout)

    def interrupt(self, target: int = 0) -> None:
        if self._lost is None:  # else nothing of this session runs any more
            self.request("interrupt", {"target": target}, waiter=False)

    def cancel_queued(self, target: int) -> bool:
        """Ask the server to drop a queued request; True if it never ran."""
        if self._lost is not None:
            return False
        request = self.request("cancel", {"target": target}, waiter=False)
        try:
            answer = request.future.result(timeout=10)
        except (concurrent.futures.TimeoutError, errors.MympsError):
            return False
        return bool(answer.get("cancelled"))

    def pull_one(self, name: str) -> Any:
        """One name's value from the namespace: what a cell's `RemoteValue.fetch` pulls."""
        return self.call("pull", {"names": [name]})[0]

    def withdraw(self, rid: int) -> bool:
        """Drop a request that never ran: the server's queue forgets it, then this channel does;
        True if it did (the future then cancels itself)."""
        if not self.cancel_queued(rid):
            return False
        self._reader.remove(rid)
        return True

    # -- reading (for the reader role's holder: see _reader.py) ----------------------------------

    @property
    def keepalive_s(self) -> float:
        return KEEPALIVE_S

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def socket(self) -> ClientWebSocket | None:
        return self._ws

    def read_one(self, timeout: float | None) -> bool:
        """Read and dispatch one message if one comes within ``timeout`` (the role's holder only).

        Returns False only when the session is closed or could not be reopened.
        """
        ws = self._ws
        if ws is None or ws.closed:
            return self.reconnect()
        try:
            if not ws.wait_readable(timeout):  # a Ctrl-C while waiting here loses nothing
                return True
        except (OSError, ValueError):  # ValueError: the socket was closed meanwhile
            return self.reconnect()
        before = ws.consumed
        frame = None
        try:
            message, in_place = ws.recv(self._decoder.chunk_target)
            decoder = self._decoder
            frame = decoder.chunk_filled(memoryview(message).nbytes) if in_place else decoder.feed(message)
            if frame is not None:
                self._dispatch(frame)
        except Closed as closed:
            return self._closed_by_server(closed)
        except MessageTooBig as exc:
            # The server would replay the same message on every resume: stop here instead.
            self._drop(ws)
            self._halt(errors.ConnectionError(
                f"{exc}. The session stopped (a value or display that large cannot come back): "
                "reset() (%mymps reset) starts a new one"))
            return False
        except (OSError, wire.WireFormatError):
            return self.reconnect()
        except BaseException:
            # A Ctrl-C. While still waiting for a message it cost nothing; after part of one
            # was taken, the stream is out of step: start over on a fresh socket, and the
            # server replays whatever was not dispatched.
            if ws.consumed != before:
                self._drop(ws)
            raise
        return True

    # -- receiving -------------------------------------------------------------------------------

    def _dispatch(self, frame: wire.Frame) -> None:
        seq = int(frame.get("seq") or 0)
        if seq and seq <= self._last_seq:
            return  # already seen before the connection dropped
        self._reader.deliver(frame)
        self._last_seq = max(self._last_seq, seq)
        # Acked at once after many frames or bytes (output too: the server keeps at most
        # --session-buffer of what is not acknowledged, and drops output past it, so a cell that
        # prints more than that must be acknowledged as it is read); otherwise the next request
        # carries the ack.
        self._unacked_bytes += sum(memoryview(b).nbytes for b in frame.buffers) + len(frame.get("text") or "")
        if self._unacked_bytes >= self._ack_bytes or self._last_seq - self._acked >= _ACK_EVERY:
            self._acked = self._last_seq
            self._unacked_bytes = 0
            self._send(wire.ack(self._last_seq))

    def close(self) -> None:
        self._closed = True
        ws = self._ws
        if ws is not None:
            ws.close()
        self._reader.poke()
        self._reader.fail_all(errors.ConnectionError("The client was closed."))

