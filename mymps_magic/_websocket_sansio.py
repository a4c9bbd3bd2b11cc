"""The session channel's WebSocket client on websockets' sans-I/O ``ClientProtocol``.

The same interface as :mod:`mymps_magic._websocket`'s hand-written client, and the same
reader role: the thread that waits for an answer reads the plain blocking socket and feeds the
bytes to the protocol, which parses frames, answers pings and runs the closing handshake.
"""

from __future__ import annotations

import collections
import select
import socket
import threading
from collections.abc import Callable, Mapping
from typing import cast

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidState, InvalidStatus, PayloadTooBig
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import SEND_EOF
from websockets.uri import parse_uri

from mymps_magic._websocket import MAX_MESSAGE, Closed, HandshakeError, MessageTooBig

_READ_SIZE = 1 << 20
_NO_STATUS = 1005  # what the protocol reports for a close frame without a code


class ClientWebSocket:
    """One open WebSocket connection; see :meth:`connect`."""

    def __init__(self, sock: socket.socket, protocol: ClientProtocol, events: list[Frame]) -> None:
        self.sock = sock
        self._protocol = protocol
        self._events: collections.deque[Frame] = collections.deque(events)
        self._failure: BaseException | None = None
        self._chunk = bytearray(_READ_SIZE)
        self._state_lock = threading.Lock()  # the protocol object: reader and senders
        self._write_lock = threading.Lock()  # the socket's outgoing bytes, one frame after another
        self._fragments: list[bytes | bytearray | memoryview] = []
        self.consumed = 0
        """Moves whenever the stream advanced (bytes handed to the protocol, a message handed
        out): a read stopped (Ctrl-C) while it stood still left the stream intact."""
        self.closed = False

    @classmethod
    def connect(cls, host: str, port: int, path: str, headers: Mapping[str, str], timeout: float,
                max_size: int = MAX_MESSAGE) -> ClientWebSocket:
        """Open a TCP connection and do the opening handshake.

        Raises:
            OSError: the server cannot be reached (or did not answer within ``timeout``).
            HandshakeError: it answered with another HTTP status (401 for a bad token).
        """
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            protocol = ClientProtocol(parse_uri(f"ws://{host}:{port}{path}"), max_size=max_size)
            request = protocol.connect()
            for name, value in headers.items():
                request.headers[name] = value
            protocol.send_request(request)
            sock.sendall(b"".join(protocol.data_to_send()))
            while True:
                data = sock.recv(65536)
                if data:
                    protocol.receive_data(data)
                else:
                    protocol.receive_eof()
                received = protocol.events_received()
                if received or not data:
                    break
            if protocol.handshake_exc is not None:
                exc = protocol.handshake_exc
                if isinstance(exc, InvalidStatus):
                    raise HandshakeError(exc.response.status_code, bytes(exc.response.body or b""))
                raise OSError(f"the server's WebSocket handshake answer is not valid ({exc})")
            if not received or not isinstance(received[0], Response):
                raise OSError("the server closed the connection during the handshake")
            events = [event for event in received[1:] if isinstance(event, Frame)]
            sock.sendall(b"".join(protocol.data_to_send()))  # pongs to pings that came with the answer
            sock.settimeout(None)
            return cls(sock, protocol, events)
        except BaseException:
            sock.close()
            raise

    # -- sending ---------------------------------------------------------------------------------

    def send(self, payload: bytes | bytearray | memoryview) -> None:
        """Send one binary message. Raises OSError when the connection is broken or closing."""
        with self._write_lock:
            with self._state_lock:
                try:
                    self._protocol.send_binary(payload)
                except InvalidState:
                    raise OSError("the WebSocket connection is closing") from None
                writes = self._protocol.data_to_send()
            self._write(writes)

    def _write(self, writes: list[bytes]) -> None:
        for data in writes:
            if data is SEND_EOF or not data:
                self.sock.shutdown(socket.SHUT_WR)
            else:
                self.sock.sendall(data)

    # -- receiving -------------------------------------------------------------------------------

    def buffered(self) -> bool:
        """True when a frame already parsed waits here, so ``recv`` need not block."""
        return bool(self._events) or self._failure is not None

    def wait_readable(self, timeout: float | None, *also: int) -> list[int]:
        """Block until the socket (or one of ``also``, file descriptors) can be read, or the
        timeout passes; returns which of them are ready (the socket as its ``fileno()``).
        Interrupting this wait (Ctrl-C) never loses data. With no timeout and nothing else to
        watch it returns at once: ``recv`` blocks just as well, one system call sooner."""
        if self.buffered() or (timeout is None and not also):
            return [self.sock.fileno()]
        ready, _, _ = select.select([self.sock.fileno(), *also], [], [], timeout)
        return ready

    def recv(self, into: Callable[[int], memoryview | None] | None = None) -> tuple[bytes | memoryview, bool]:
        """The next data message; pings are answered on the way.

        ``into(n)`` may give a writable view of exactly ``n`` bytes for a message of that size;
        the payload is then copied into it. Returns the payload and whether it went there.

        Raises:
            Closed: the server closed the connection (or the socket reached its end).
            MessageTooBig: the server sent a message over ``max_size``.
            OSError: the socket broke.
        """
        while True:
            while not self._events:
                if self._failure is not None:
                    raise self._failure
                self._read()
            frame = self._events.popleft()
            if frame.opcode is Opcode.CLOSE:
                self.close()
                close = self._protocol.close_rcvd
                code = None if close is None or close.code == _NO_STATUS else close.code
                raise Closed(code, close.reason if close is not None else "")
            if frame.opcode not in (Opcode.BINARY, Opcode.TEXT, Opcode.CONT):
                continue  # a ping (the protocol answered it) or a pong
            self._fragments.append(frame.data)
            if not frame.fin:
                continue
            parts, self._fragments = self._fragments, []
            message = parts[0] if len(parts) == 1 else b"".join(parts)
            self.consumed += len(message)
            target = into(len(message)) if into is not None and message else None
            if target is not None:
                target[:] = message
                return target, True
            return memoryview(message), False

    def _read(self) -> None:
        """Read what the socket has, hand it to the protocol, keep the frames it parsed."""
        got = self.sock.recv_into(self._chunk)
        self.consumed += got
        with self._state_lock:
            if got:
                # receive_data only appends to a bytearray, which takes any buffer
                self._protocol.receive_data(cast(bytes, memoryview(self._chunk)[:got]))
            else:
                self._protocol.receive_eof()
            events = self._protocol.events_received()
            writes = self._protocol.data_to_send()
            failure = self._protocol.parser_exc
        self._events.extend(event for event in events if isinstance(event, Frame))
        if writes:
            with self._write_lock:
                try:
                    self._write(writes)
                except OSError:
                    pass  # the next read finds the socket broken
        if isinstance(failure, PayloadTooBig):
            self._failure = MessageTooBig(
                f"The server sent a message of {(failure.size or 0) + (failure.current_size or 0):,} bytes, over the "
                f"client's limit of {self._protocol.max_message_size:,} bytes; is it a mymps server of the same version?")
        elif isinstance(failure, EOFError) or (not got and not self._events):
            self._failure = Closed(None, "the connection ended")
        elif failure is not None:
            self._failure = Closed(1002, str(failure))
        if self._failure is not None:
            self.close()

    def close(self) -> None:
        """Close the socket (without waiting for the server's side of the closing handshake);
        a thread blocked reading it wakes up."""
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
