"""Reading an HTTP answer off a raw socket, for the tests that send what no HTTP client would
(a broken head, a body cut short, an endless upload) and check what the server answers."""

from __future__ import annotations

import socket

__all__ = ["read_answer", "read_head"]


def read_head(sock: socket.socket) -> bytes:
    """What the server sent until its answer's head was complete (maybe some of the body too),
    or until it closed the connection first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def read_answer(sock: socket.socket) -> tuple[bytes, bytes]:
    """One answer's head (without its blank line) and body: the body as long as its
    Content-Length says, or what came before the server closed."""
    head, _, body = read_head(sock).partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), None)
    while length is not None and len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head, body
