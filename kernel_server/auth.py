"""The token and the body limit, enforced before anything of a request is read.

FastAPI reads (and parses) a request body before its dependencies run, so a dependency cannot
promise that an unauthenticated body is never parsed or unpickled. This is a pure ASGI middleware
instead: it looks only at the headers, answers 401 or 413 itself, and otherwise hands the request
on with a ``receive`` that stops a body growing past ``--max-body`` even without a
Content-Length: it answers 413 itself and tells the app the client went away, since FastAPI
would turn any exception raised while it reads a body into a 400.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from pathlib import Path

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mymps_magic import wire

from .errors import TokenFileError
from .openai_bodies import OPENAI_PREFIX, error_code
from .openai_bodies import error_body as openai_error

log = logging.getLogger("kernel_server")

# Paths anyone who reaches the port may call: they reveal no token and run nothing.
PUBLIC_PATHS = frozenset({"/health"})


def load_or_create_token(token_file: Path, token: str | None) -> str:
    """Return the token the server accepts, creating the token file on first start.

    ``MYMPS_TOKEN`` wins when set. Otherwise the file is created with mode 0600 (``O_EXCL``, so
    a file planted by someone else is never silently trusted with wider permissions) and read on
    later starts; a file others can read is narrowed to 0600.

    Raises:
        TokenFileError: the token file exists but is empty.
        OSError: the token file cannot be created or read.
    """
    if token:
        return token
    token_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if token_file.stat().st_mode & 0o077:
            token_file.chmod(0o600)
        value = token_file.read_text().strip()
        if not value:
            raise TokenFileError(f"the token file {token_file} is empty; delete it and start again") from None
        return value
    value = new_token()
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    return value


def new_token() -> str:
    """256 random bits as hex: a token never starts with ``-``, which a command line (``%mymps
    connect --token ...``) would take for an option, and needs no quoting in a shell."""
    return secrets.token_hex(32)


class TokenKeeper:
    """The token the server accepts now.

    A token from ``MYMPS_TOKEN`` is fixed. One from the token file may be replaced while the
    server runs (``mymps token rotate`` writes a new file): every check stats the file, about a
    microsecond, and reads it again when it changed, so the old token is refused from the next
    request on, without a restart. A file that goes missing or empty keeps the token in use.

    Args:
        token: the token in use at start.
        file: the token file to follow; None for a fixed token.
    """

    def __init__(self, token: str, file: Path | None = None) -> None:
        self.file = file
        self._stamp = self._stat()
        self._header = f"Bearer {token}".encode()
        self.known: tuple[str, ...] = (token,)
        """Every token this server has accepted: the log redacts them all, old ones included."""

    def _stat(self) -> tuple[int, int, int] | None:
        if self.file is None:
            return None
        try:
            st = os.stat(self.file)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def header(self) -> bytes:
        """``Bearer <token>`` as the Authorization header must carry it now."""
        stamp = self._stat()
        if stamp is not None and stamp != self._stamp:
            self._stamp = stamp
            self._reload()
        return self._header

    def _reload(self) -> None:
        assert self.file is not None
        try:
            token = self.file.read_text().strip()
        except OSError as exc:
            log.warning("the token file %s changed but cannot be read (%s); the token stays as it was",
                        self.file, exc.strerror)
            return
        if not token or f"Bearer {token}".encode() == self._header:
            return
        self.known += (token,)
        self._header = f"Bearer {token}".encode()
        log.info("the token file %s changed: its new token is in use, the old one is refused", self.file)


class GuardMiddleware:
    """Token check and body limit for every HTTP request and WebSocket handshake."""

    def __init__(self, app: ASGIApp, *, token: TokenKeeper, max_body: int, token_source: str) -> None:
        """``token_source`` says where the server's token is (its file's path, or
        ``MYMPS_TOKEN``), for the 401 message: the path is no secret, and a user whose server
        keeps its home elsewhere than ``~/.mymps`` needs it to find the token."""
        self.app = app
        self._token = token
        self.max_body = max_body
        self._unauthorized = (f"missing or wrong token: send 'Authorization: Bearer <token>' (the token is in "
                              f"{token_source} on the server; `mymps tunnel` fetches it)")

    def _authorized(self, scope: Scope) -> bool:
        for key, value in scope.get("headers", ()):
            if key == b"authorization":
                return hmac.compare_digest(value, self._token.header())
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            if not self._authorized(scope):
                # Closing before accept refuses the handshake (HTTP 403): no frame is ever read.
                await send({"type": "websocket.close", "code": 1008, "reason": "missing or wrong token"})
                return
        elif scope["type"] == "http":
            if scope["path"] not in PUBLIC_PATHS and not self._authorized(scope):
                await _reject(scope, receive, send, 401, self._unauthorized)
                return
            length = _content_length(scope)
            if length is not None and length > self.max_body:
                await _reject(scope, receive, send, 413, f"request body of {length} bytes is over the server's "
                              f"--max-body of {self.max_body} bytes")
                return
            await self._limited(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        seen = 0
        rejected = False
        limit = self.max_body

        async def limited_receive() -> Message:
            nonlocal seen, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    rejected = True
                    await _reject(scope, receive, send, 413,
                                  f"request body is over the server's --max-body of {limit} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not rejected:  # after our 413 the app's own answer has nowhere to go
                await send(message)

        await self.app(scope, limited_receive, guarded_send)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _reject(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
    """Answer ``status``; on the OpenAI-compatible paths in OpenAI's error shape, which its clients read."""
    openai = str(scope.get("path", "")).startswith(OPENAI_PREFIX + "/")
    body = openai_error(message, status, error_code(status)) if openai else wire.error_body(message)
    await JSONResponse(body, status_code=status)(scope, receive, send)
