"""`TokenStream`: the pieces of a streamed generation, for plain loops and for ``async for``.

One object serves both uses so that `MympsClient` stays a true alias of `Client`: the original
README's ``async with client.stream_generate(...) as s: async for token in s`` runs unchanged,
and ``for piece in client.stream_generate(...)`` works where no event loop is wanted (a notebook
cell, whose kernel already runs a loop, cannot call ``asyncio.run``). The sync side uses
websockets' threaded client, so it never touches an event loop.

Each stream is one ``/ws/generate`` connection, opened on first use. Leaving it before the end
(``break``, ``close()``, ``aclose()``, leaving the ``with`` block, an exception or the stop button
in the loop) cancels the generation, and returns only once the server has stopped it.

Why a cancel message and not just a close: the server's WebSocket layer answers a close frame at
once, before the generation has seen it, so a client whose close returned could still find its
job in ``/jobs`` (the stop button's cell ended with the job still running). Instead the client
sends ``{"type": "cancel"}`` (`wire.cancel_message`) and reads on until the server's ``done`` frame,
which the server sends once the job has stopped; that frame (``stop_reason: "cancelled"``, the
tokens generated so far) becomes `TokenStream.stats`. The wait is bounded by the client's
timeout; a server that closes instead (an older one) leaves stats counted on this side.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from mymps_magic import errors, wire

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection as AsyncConnection
    from websockets.sync.client import ClientConnection as SyncConnection

    from mymps_magic._connection import Connection

GENERATE_PATH = "/ws/generate"


class StreamRequest(Protocol):
    """What a stream sends first: ``wire.GenerateRequest``, or another endpoint's request that
    speaks ``/ws/generate``'s messages (``wire.ChatRequest`` on ``/ws/chat``)."""

    @property
    def model(self) -> str: ...

    def to_json(self) -> dict[str, Any]: ...


class TokenStream:
    """The text pieces of one generation, as they come.

    Iterate it with ``for`` or ``async for`` (one or the other, once). After the last piece,
    or after leaving early, `stats` holds the server's closing figures.

    Attributes:
        stats: None until the stream ends, then ``{"tokens_generated", "time_s",
            "tokens_per_s", "stop_reason"}`` as the server sent them; ``stop_reason`` is
            ``"cancelled"`` for a stream left early.
        result: None until the stream ends, then the original client's ``.result``: `stats`
            plus ``text``, every piece received (what ``generate`` would have answered).

    Raises (while iterating):
        NotFoundError: the model is not loaded.
        BadRequestError: the server rejected an argument.
        AuthError, ConnectionError, ServerError: as for any other call.
    """

    def __init__(self, connection: Connection, request: StreamRequest, *, path: str = GENERATE_PATH) -> None:
        self._connection = connection
        self._request = request
        self._path = path
        self._sync: SyncConnection | None = None
        self._async: AsyncConnection | None = None
        self._finished = False
        self._pieces: list[str] = []
        self._sent_at = 0.0
        self.stats: dict[str, Any] | None = None

    @property
    def result(self) -> dict[str, Any] | None:
        return None if self.stats is None else {"text": "".join(self._pieces), **self.stats}

    def __repr__(self) -> str:
        state = "finished" if self._finished else "open" if self._sync or self._async else "not started"
        return f"<TokenStream {self._request.model!r} {state}>"

    # The plain iterator.

    def __iter__(self) -> Iterator[str]:
        """The pieces, through a generator: a ``for`` loop left by ``break`` or ``return`` drops
        it, CPython closes it on the spot, and that closes the stream (cancelling the job)."""
        try:
            while True:
                try:
                    piece = self.__next__()
                except StopIteration:
                    return
                yield piece
        finally:
            self.close()

    def __next__(self) -> str:
        if self._finished:
            raise StopIteration
        try:
            with self._connection.ws_errors():
                if self._sync is None:
                    from websockets.sync.client import connect

                    self._sync = connect(
                        self._connection.ws_url(self._path),
                        additional_headers=self._connection.headers,
                        open_timeout=self._connection.timeout,
                        proxy=None,  # a tunnel endpoint, not the internet (see _connection.py)
                        legacy=True,  # closed by close(), not by a with-block
                    )
                    self._sync.send(json.dumps(self._request.to_json()))
                    self._sent_at = time.monotonic()
                while not self._finished:
                    piece = self._handle(self._sync.recv())
                    if piece is not None:
                        return piece
        except BaseException:
            self.close()
            raise
        self.close()
        raise StopIteration

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop a stream read with ``for``: returns once the server has stopped generating, with
        `stats` set. Safe to call twice."""
        ws, self._sync = self._sync, None
        try:
            if ws is not None and not self._finished:
                self._cancel(ws)
        finally:
            self._finished = True
            if ws is not None:
                ws.close()

    def _cancel(self, ws: SyncConnection) -> None:
        """Ask the server to stop, and read up to its ``done`` frame (see the module docstring)."""
        from websockets.exceptions import WebSocketException

        deadline = time.monotonic() + self._connection.timeout
        try:
            ws.send(json.dumps(wire.cancel_message()))
            while not self._finished:
                self._settle(ws.recv(timeout=max(0.0, deadline - time.monotonic())))
        except (WebSocketException, OSError, TimeoutError):
            pass  # gone or too slow: the figures counted here stand in for the server's
        finally:
            self._left_early()

    # The async iterator and context manager of the original client.

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> str:
        if self._finished:
            raise StopAsyncIteration
        try:
            with self._connection.ws_errors():
                if self._async is None:
                    await self._open_async()
                assert self._async is not None
                while not self._finished:
                    piece = self._handle(await self._async.recv())
                    if piece is not None:
                        return piece
        except BaseException:
            await self.aclose()
            raise
        await self.aclose()
        raise StopAsyncIteration

    async def __aenter__(self) -> TokenStream:
        try:
            with self._connection.ws_errors():
                await self._open_async()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the stream from async code: returns once the server has stopped generating, with
        `stats` set. Safe to call twice."""
        ws, self._async = self._async, None
        try:
            if ws is not None and not self._finished:
                await self._acancel(ws)
        finally:
            self.close()
            if ws is not None:
                await ws.close()

    async def _acancel(self, ws: AsyncConnection) -> None:
        """`_cancel` for the async connection."""
        import asyncio

        from websockets.exceptions import WebSocketException

        async def read_to_done() -> None:
            await ws.send(json.dumps(wire.cancel_message()))
            while not self._finished:
                self._settle(await ws.recv())

        try:
            await asyncio.wait_for(read_to_done(), self._connection.timeout)  # asyncio.timeout is 3.11+
        except (WebSocketException, OSError, asyncio.TimeoutError):
            pass
        finally:
            self._left_early()

    async def _open_async(self) -> None:
        if self._async is not None:
            return
        from websockets.asyncio.client import connect

        self._async = await connect(
            self._connection.ws_url(self._path),
            additional_headers=self._connection.headers,
            open_timeout=self._connection.timeout,
            proxy=None,
        )
        await self._async.send(json.dumps(self._request.to_json()))
        self._sent_at = time.monotonic()

    def _handle(self, raw: str | bytes) -> str | None:
        """Read one frame: a token's text, or None after ``done`` (and for frame types added later)."""
        try:
            message = wire.read_generate_message(raw)
        except wire.WireFormatError:
            raise errors.ServerError(
                "The server sent a stream frame mymps cannot read. Is it a mymps server?") from None
        if isinstance(message, wire.Token):
            self._pieces.append(message.text)
            return message.text
        if isinstance(message, wire.Done):
            self._finished = True
            self.stats = message.stats
        elif isinstance(message, wire.ErrorBody):
            self._finished = True
            raise self._connection.error_from(message)
        return None

    def _settle(self, raw: str | bytes) -> None:
        """Read one frame while cancelling: an error frame ends the stream without raising (the
        user asked to stop; what went wrong after that is not theirs to handle)."""
        try:
            self._handle(raw)
        except errors.MympsError:
            self._finished = True

    def _left_early(self) -> None:
        """Stats for a stream left early whose server sent no ``done`` frame: counted here."""
        if self.stats is not None:
            return
        elapsed = time.monotonic() - self._sent_at if self._sent_at else 0.0
        pieces = len(self._pieces)
        self.stats = {"tokens_generated": pieces, "time_s": round(elapsed, 4),
                      "tokens_per_s": round(pieces / elapsed, 2) if elapsed > 0 else 0.0,
                      "stop_reason": "cancelled"}
