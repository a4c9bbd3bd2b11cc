"""A small WebSocket client (RFC 6455) on a plain blocking socket, for the session channel.

Why not websockets' sync client: it reads the socket on a thread of its own, so every message
crosses two threads before the caller has it, and on a no-op call those hops cost more than the
call itself. Here the thread that waits for an answer reads the socket, and a large message can
be read straight into the buffer that will hold it (``recv(into=...)``), so a pulled array is
never copied in user space.

Why not websockets' sans-I/O ``ClientProtocol`` on the same socket, read by the same waiting
thread (measured in issue 11, commit e8b363a, ``--drivers`` of ``benchmarks/noop_roundtrip.py``
and ``push_pull.py``, medians of 3 runs of interleaved rounds on a busy 2-core machine): the no-op
``run`` was the same within the noise (median 390 us here, 367 us with the library), but a pull of
256 MiB ran at 207 MB/s against 358 MB/s here. The protocol parses every frame into a fresh
bytearray (appended to its buffer, then sliced out), so each 4 MiB chunk is copied twice in
fresh memory and once more into the array; here it is read straight into the array.

Only what the session channel needs: binary messages, ping/pong, the closing handshake, and a
bound on one message (``max_size``). Sending is thread-safe; receiving is for one thread at a
time (the session's reader role).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Mapping

try:
    from websockets.speedups import apply_mask
except ImportError:  # websockets built without its C extension: its own pure-Python mask, as it does itself
    from websockets.utils import apply_mask

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_HEAD = 64 * 1024
_READ_SIZE = 1 << 20
MAX_MESSAGE = 1 << 30
"""Largest message the client takes (``max_size``): far above the largest a mymps server sends
(data in ``wire.CHUNK`` pieces, output frames within its ``--session-buffer``, 256 MiB by
default), while a broken or hostile server cannot make it allocate without bound."""
"""Bytes asked of the socket at once: large enough that a big message takes few system calls."""

_MASKS_AT_ONCE = 1024
"""Masking keys fetched from the OS in one call (see ``ClientWebSocket._next_mask``)."""


def _libc_send() -> Callable[[int, bytes, int, int], int] | None:
    """libc's ``send``, called without letting go of the GIL (see `ClientWebSocket._send_small`);
    None where there is no libc to load (Windows)."""
    try:
        send = ctypes.PyDLL(None).send
    except (OSError, AttributeError, TypeError):
        return None
    send.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
    send.restype = ctypes.c_ssize_t
    return send


_SEND = _libc_send()
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)  # never blocks holding the GIL: what does not fit goes by sendall

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_SHORT = struct.Struct(">H")
_LONG = struct.Struct(">Q")


class HandshakeError(Exception):
    """The server answered the opening handshake with an HTTP status other than 101."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


class Closed(Exception):
    """The connection is closed; ``code`` is the close code the server sent, if it sent one."""

    def __init__(self, code: int | None = None, reason: str = "") -> None:
        super().__init__(f"closed ({code}) {reason}".strip())
        self.code = code
        self.reason = reason


class MessageTooBig(Exception):
    """The server sent a message over the client's ``max_size``; the connection is closed (1009)."""


class ClientWebSocket:
    """One open WebSocket connection; see :meth:`connect`."""

    def __init__(self, sock: socket.socket, leftover: bytes = b"", max_size: int = MAX_MESSAGE) -> None:
        self.sock = sock
        self.max_size = max_size
        self._buf = bytearray(leftover)
        self._pos = 0
        self._chunk = bytearray(_READ_SIZE)  # read into, then appended: no fresh 1 MiB object per read
        self._send_lock = threading.Lock()
        self._masks, self._mask_at = b"", 0  # masking keys fetched ahead (see _next_mask)
        self._fragments: list[bytes] = []
        self.consumed = 0
        """Bytes of the stream taken so far: a read stopped (Ctrl-C) before it took any left the
        stream intact; one stopped after, in the middle of a message, did not."""
        self.closed = False

    @classmethod
    def connect(cls, host: str, port: int, path: str, headers: Mapping[str, str], timeout: float,
                max_size: int = MAX_MESSAGE) -> ClientWebSocket:
        """Open a TCP connection and do the opening handshake; ``max_size`` bounds one message.

        Raises:
            OSError: the server cannot be reached (or did not answer within ``timeout``).
            HandshakeError: it answered with another HTTP status (401 for a bad token).
        """
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            key = base64.b64encode(os.urandom(16))
            lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket", "Connection: Upgrade",
                     f"Sec-WebSocket-Key: {key.decode()}", "Sec-WebSocket-Version: 13"]
            lines += [f"{name}: {value}" for name, value in headers.items()]
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            head, rest = _read_head(sock)
            status, fields = _parse_head(head)
            if status != 101:
                raise HandshakeError(status, _read_body(sock, rest, fields))
            expected = base64.b64encode(hashlib.sha1(key + _GUID).digest()).decode()
            if fields.get("sec-websocket-accept") != expected:
                raise OSError("the server's WebSocket handshake answer does not match the request")
            sock.settimeout(None)
            return cls(sock, rest, max_size)
        except BaseException:
            sock.close()
            raise

    # -- sending ---------------------------------------------------------------------------------

    def send(self, payload: bytes | bytearray | memoryview, opcode: int = OP_BINARY) -> None:
        """Send one message (masked, as RFC 6455 asks of a client). Raises OSError when broken."""
        n = memoryview(payload).nbytes
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        elif n < 1 << 16:
            head = bytes((0x80 | opcode, 0x80 | 126)) + _SHORT.pack(n)
        else:
            head = bytes((0x80 | opcode, 0x80 | 127)) + _LONG.pack(n)
        with self._send_lock:
            mask = self._next_mask()
            body = apply_mask(payload, mask) if n else b""
            if n < 1 << 16:
                self._send_small(head + mask + body)
            else:
                self.sock.sendall(head + mask)
                self.sock.sendall(body)

    def _send_small(self, data: bytes) -> None:
        """Send a message that fits the socket's buffer without letting go of the GIL (the sender
        holds the send lock). ``socket.sendall`` lets go of it for the system call, and in a
        Jupyter kernel the IOPub thread, busy with the cell's first messages, then takes it and
        the request leaves only when that thread is done; sent here, the request is on its way
        first, and the IOPub thread runs while the server works (an empty ``run_cell`` in a
        kernel, on a busy 2-core machine: 0.59 -> 0.35 ms above a local cell, one run of 300
        cells each). What does not fit at once goes by ``sendall``."""
        sent = -1
        if _SEND is not None and _DONTWAIT:
            sent = _SEND(self.sock.fileno(), data, len(data), _DONTWAIT)
        if sent < len(data):
            self.sock.sendall(memoryview(data)[max(sent, 0):])

    def _next_mask(self) -> bytes:
        """A fresh masking key (the sender holds the send lock). The keys come from the OS's
        strong entropy, as RFC 6455 asks, but :data:`_MASKS_AT_ONCE` at a time: ``os.urandom``
        is a system call that lets go of the GIL, and in a Jupyter kernel, at the start of a cell,
        the kernel's IOPub thread takes it there and a quick call waits for it to finish."""
        if self._mask_at >= len(self._masks):
            self._masks, self._mask_at = os.urandom(4 * _MASKS_AT_ONCE), 0
        self._mask_at += 4
        return self._masks[self._mask_at - 4:self._mask_at]

    # -- receiving -------------------------------------------------------------------------------

    def buffered(self) -> bool:
        """True when bytes already read from the socket wait here, so ``recv`` need not block."""
        return self._pos < len(self._buf)

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
        """The next data message, answering pings on the way.

        ``into(n)`` may give a writable view of exactly ``n`` bytes for a message of that size;
        the payload is then read straight into it. Returns the payload and whether it went there.

        Raises:
            Closed: the server closed the connection (or the socket reached its end).
            MessageTooBig: the server sent a message over ``max_size``.
            OSError: the socket broke.
        """
        while True:
            first, second = self._take(2)
            opcode, fin, n = first & 0x0F, first & 0x80, second & 0x7F
            if second & 0x80:
                raise Closed(1002, "the server sent a masked frame")
            if n == 126:
                (n,) = _SHORT.unpack(self._take(2))
            elif n == 127:
                (n,) = _LONG.unpack(self._take(8))
            if opcode < OP_CLOSE and n + sum(map(len, self._fragments)) > self.max_size:
                self._refuse(n)
            if opcode >= OP_CLOSE:
                self._control(opcode, bytes(self._take(n)))
                continue
            if fin and opcode != OP_CONT and not self._fragments:
                target = into(n) if into is not None and n else None
                if target is not None:
                    self._take_into(target)
                    return target, True
                return bytes(self._take(n)), False
            self._fragments.append(bytes(self._take(n)))
            if fin:
                message, self._fragments = b"".join(self._fragments), []
                return message, False

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            self.send(payload, OP_PONG)
        elif opcode == OP_CLOSE:
            code = _SHORT.unpack(payload[:2])[0] if len(payload) >= 2 else None
            reason = payload[2:].decode("utf-8", "replace")
            with contextlib.suppress(OSError):
                self.send(payload[:2], OP_CLOSE)  # the closing handshake's answer, then done
            self.close()
            raise Closed(code, reason)

    def _refuse(self, n: int) -> None:
        """Close with 1009 (message too big), as RFC 6455 asks, before anything is allocated."""
        with contextlib.suppress(OSError):
            self.send(_SHORT.pack(1009), OP_CLOSE)
        self.close()
        raise MessageTooBig(f"The server sent a message of {n + sum(map(len, self._fragments)):,} bytes, over the "
                            f"client's limit of {self.max_size:,} bytes; is it a mymps server of the same version?")

    def _fill(self, n: int) -> None:
        """Read until at least ``n`` bytes are buffered."""
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[:self._pos]
            self._pos = 0
        while len(self._buf) - self._pos < n:
            got = self.sock.recv_into(self._chunk)
            if not got:
                self.closed = True
                raise Closed(None, "the connection ended")
            self._buf += memoryview(self._chunk)[:got]

    def _take(self, n: int) -> memoryview:
        if len(self._buf) - self._pos < n:
            self._fill(n)
        start = self._pos
        self._pos += n
        self.consumed += n
        return memoryview(self._buf)[start:start + n]

    def _take_into(self, target: memoryview) -> None:
        n = target.nbytes
        have = min(n, len(self._buf) - self._pos)
        target[:have] = memoryview(self._buf)[self._pos:self._pos + have]
        self._pos += have
        self.consumed += n  # counted at once: stopped half way, the stream is out of step anyway
        while have < n:
            got = self.sock.recv_into(target[have:], n - have)
            if not got:
                self.closed = True
                raise Closed(None, "the connection ended")
            have += got

    def close(self) -> None:
        """Close the socket (without waiting for the server's side of the closing handshake);
        a thread blocked reading it wakes up."""
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > _MAX_HEAD:
            raise OSError("the server's handshake answer is too long")
        chunk = sock.recv(4096)
        if not chunk:
            raise OSError("the server closed the connection during the handshake")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    status_line, *lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise OSError(f"not an HTTP answer: {status_line[:80]!r}")
    fields = {}
    for line in lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(parts[1]), fields


def _read_body(sock: socket.socket, rest: bytes, fields: Mapping[str, str]) -> bytes:
    """The body of a refusal (its ``{"error"}`` message), read as far as it is announced."""
    try:
        length = min(int(fields.get("content-length", "0")), _MAX_HEAD)
    except ValueError:
        return rest
    try:
        while len(rest) < length:
            chunk = sock.recv(length - len(rest))
            if not chunk:
                break
            rest += chunk
    except OSError:
        pass
    return rest[:length]
