"""`TokenStream`: the pieces of a streamed generation, for plain loops and for ``async for``.

One object serves both uses so that `MympsClient` stays a true alias of `Client`: the original
README's ``async with client.stream_generate(...) as s: async for token in s`` runs unchanged,
and ``for piece in client.stream_generate(...)`` works where no event loop is wanted (a notebook
cell, whose kernel already runs a loop, cannot call ``asyncio.run``). The sync side uses
websockets' threaded client, so it never touches an event loop.

Each stream is one ``/ws/generate`` connection, opened on first use. Closing it before the end
(``close()``, ``aclose()``, leaving the ``with`` block, an exception in the loop) closes the
WebSocket, and the server cancels the generation.
"""

from __future__ import annotations

import json
from types import TracebackType
from typing import TYPE_CHECKING, Any

from mymps_magic import errors, wire

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection as AsyncConnection
    from websockets.sync.client import ClientConnection as SyncConnection

    from mymps_magic._connection import Connection

GENERATE_PATH = "/ws/generate"


class TokenStream:
    """The text pieces of one generation, as they come.

    Iterate it with ``for`` or ``async for`` (one or the other, once). After the last piece,
    `stats` holds the server's closing figures.

    Attributes:
        stats: None until the stream ends, then ``{"tokens_generated", "time_s",
            "tokens_per_s", "stop_reason"}`` as the server sent them.

    Raises (while iterating):
        NotFoundError: the model is not loaded.
        BadRequestError: the server rejected an argument.
        AuthError, ConnectionError, ServerError: as for any other call.
    """

    def __init__(self, connection: Connection, request: dict[str, Any]) -> None:
        self._connection = connection
        self._request = request
        self._sync: SyncConnection | None = None
        self._async: AsyncConnection | None = None
        self._finished = False
        self.stats: dict[str, Any] | None = None

    def __repr__(self) -> str:
        state = "finished" if self._finished else "open" if self._sync or self._async else "not started"
        return f"<TokenStream {self._request.get('model')!r} {state}>"

    # The plain iterator.

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> str:
        if self._finished:
            raise StopIteration
        try:
            with self._connection.ws_errors():
                if self._sync is None:
                    from websockets.sync.client import connect

                    self._sync = connect(
                        self._connection.ws_url(GENERATE_PATH),
                        additional_headers=self._connection.headers,
                        open_timeout=self._connection.timeout,
                        proxy=None,  # a tunnel endpoint, not the internet (see _connection.py)
                        legacy=True,  # closed by close(), not by a with-block
                    )
                    self._sync.send(json.dumps(self._request))
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
        """Close a stream read with ``for``; the server stops generating. Safe to call twice."""
        self._finished = True
        ws, self._sync = self._sync, None
        if ws is not None:
            ws.close()

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
        """Close the stream from async code; the server stops generating. Safe to call twice."""
        self.close()
        ws, self._async = self._async, None
        if ws is not None:
            await ws.close()

    async def _open_async(self) -> None:
        if self._async is not None:
            return
        from websockets.asyncio.client import connect

        self._async = await connect(
            self._connection.ws_url(GENERATE_PATH),
            additional_headers=self._connection.headers,
            open_timeout=self._connection.timeout,
            proxy=None,
        )
        await self._async.send(json.dumps(self._request))

    def _handle(self, raw: str | bytes) -> str | None:
        """Read one frame: a token's text, or None after ``done`` (and for frame types added later)."""
        try:
            frame = json.loads(raw)
        except ValueError:
            frame = None
        if not isinstance(frame, dict):
            raise errors.ServerError("The server sent a stream frame mymps cannot read. Is it a mymps server?")
        kind = frame.get("type")
        if kind == wire.MSG_TOKEN:
            return str(frame.get("text", ""))
        if kind == wire.MSG_DONE:
            self._finished = True
            self.stats = {key: value for key, value in frame.items() if key != "type"}
        elif kind == wire.MSG_ERROR:
            self._finished = True
            raise self._connection.error_frame(frame)
        return None
