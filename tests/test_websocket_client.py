"""The session channel's own WebSocket client (``mymps_magic/_websocket.py``) and its keepalive.

The client is checked against a real ``websockets`` server (another implementation than the
mymps server's uvicorn), for what the session channel relies on: pings answered while it waits,
fragmented and large messages, the bound on one message, close codes and refused handshakes.
Then, against the real mymps server with fast keepalive pings, that an idle session answers them
from its background reader and keeps its connection.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kit import ServerProcess
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Response

import mymps_magic._session
from mymps_magic import Client
from mymps_magic._websocket import ClientWebSocket, Closed, HandshakeError, MessageTooBig

Handler = Callable[[ServerConnection], Awaitable[None]]


class EchoServer:
    """A ``websockets`` server on a free loopback port, running ``handler`` per connection in a
    thread of its own; ``refuse`` makes it answer the handshake with HTTP 401 instead."""

    def __init__(self, handler: Handler, refuse: bool = False) -> None:
        self.handler = handler
        self.refuse = refuse
        self.port = 0
        self._ready = threading.Event()
        self._stop: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def _refuse(self, connection: ServerConnection, request: Any) -> Response | None:
        return connection.respond(401, '{"error": "no token"}\n') if self.refuse else None

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = self._loop.create_future()
        async with serve(self.handler, "127.0.0.1", 0, process_request=self._refuse, max_size=None) as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            self._ready.set()
            await self._stop

    def __enter__(self) -> EchoServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set_result, None)
        self._thread.join(10)

    def connect(self, **options: Any) -> ClientWebSocket:
        return ClientWebSocket.connect("127.0.0.1", self.port, "/", {"Authorization": "Bearer x"}, timeout=5, **options)


def test_a_ping_is_answered_while_the_client_waits_for_a_message() -> None:
    async def handler(ws: ServerConnection) -> None:
        pong = await ws.ping(b"are you there")
        latency = await asyncio.wait_for(pong, 5)  # raises if the client never answers
        await ws.send(f"pong after {latency:.3f}s".encode())

    with EchoServer(handler) as server:
        client = server.connect()
        message, in_place = client.recv()
        assert bytes(message).startswith(b"pong after") and not in_place
        client.close()


def test_messages_of_every_length_cross_both_ways() -> None:
    """7-bit, 16-bit and 64-bit payload lengths, masked by the client, echoed by the server."""
    async def handler(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    with EchoServer(handler) as server:
        client = server.connect()
        for size in (0, 1, 125, 126, 65535, 65536, 3 * 1024 * 1024 + 7):
            payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
            client.send(payload)
            message, _ = client.recv()
            assert bytes(message) == payload, size
        client.close()


def test_a_fragmented_message_arrives_whole() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send([b"frag", b"men", b"ted"])

    with EchoServer(handler) as server:
        client = server.connect()
        assert client.recv() == (b"fragmented", False)
        client.close()


def test_a_large_message_is_read_straight_into_the_buffer_offered() -> None:
    payload = bytes(range(256)) * 8192  # 2 MiB

    async def handler(ws: ServerConnection) -> None:
        await ws.send(b"small")
        await ws.send(payload)

    with EchoServer(handler) as server:
        client = server.connect()
        target = bytearray(len(payload))
        offered: list[int] = []

        def into(n: int) -> memoryview | None:
            offered.append(n)
            return memoryview(target) if n == len(payload) else None

        assert client.recv(into) == (b"small", False)
        message, in_place = client.recv(into)
        assert in_place and message.obj is target and target == payload
        assert offered == [5, len(payload)]
        client.close()


def test_a_close_from_the_server_carries_its_code_and_reason() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.close(1008, "bad token")

    with EchoServer(handler) as server:
        client = server.connect()
        with pytest.raises(Closed) as closed:
            client.recv()
        assert (closed.value.code, closed.value.reason) == (1008, "bad token")
        assert client.closed


@pytest.mark.parametrize("fragments", [1, 4], ids=["whole", "fragmented"])
def test_a_message_over_the_limit_is_refused_with_1009_before_it_is_read(fragments: int) -> None:
    """A message up to ``max_size`` arrives; one byte more is refused from its header (or from
    the fragment that passes the limit), and the server sees the connection closed with 1009."""
    limit = 1 << 20
    codes: list[int | None] = []

    async def handler(ws: ServerConnection) -> None:
        for size in (limit, limit + 1):
            payload = bytes(size)
            step = -(-size // fragments)
            await ws.send([payload[start:start + step] for start in range(0, size, step)] if fragments > 1 else payload)
        await ws.wait_closed()
        codes.append(ws.close_code)

    with EchoServer(handler) as server:
        client = server.connect(max_size=limit)
        message, _ = client.recv()
        assert len(message) == limit
        with pytest.raises(MessageTooBig, match=f"over the client's limit of {limit:,} bytes"):
            client.recv()
        assert client.closed
        deadline = time.monotonic() + 5
        while not codes and time.monotonic() < deadline:
            time.sleep(0.01)
    assert codes == [1009]


def test_a_refused_handshake_carries_the_status_and_body() -> None:
    async def handler(ws: ServerConnection) -> None:
        raise AssertionError("a refused connection must never reach the handler")

    with EchoServer(handler, refuse=True) as server, pytest.raises(HandshakeError) as refused:
        server.connect()
    assert refused.value.status == 401
    assert b"no token" in refused.value.body


# -- the keepalive against the real server ------------------------------------------------------

FAST_PINGS = """
import sys, uvicorn
init = uvicorn.Config.__init__
def fast(self, *args, **kwargs):
    init(self, *args, **{**kwargs, "ws_ping_interval": 0.3, "ws_ping_timeout": 0.3})
uvicorn.Config.__init__ = fast
from kernel_server.__main__ import main
sys.argv[0] = "kernel_server"
sys.exit(main())
"""


class FastPingServer(ServerProcess):
    """The real server, but uvicorn pings every WebSocket every 0.3 s and drops it when the
    pong takes longer than 0.3 s (the defaults are 20 s and 20 s)."""

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-c", FAST_PINGS, *super().command[3:]]


@pytest.fixture(scope="module")
def fast_ping_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with FastPingServer(Path(tmp_path_factory.mktemp("fast-ping-server"))) as process:
        yield process


def noop() -> None:
    return None


@pytest.mark.parametrize("keepalive_s, kept", [(0.1, True), (30.0, False)], ids=["read-while-idle", "never-read"])
def test_an_idle_session_answers_pings_and_keeps_its_connection(
    fast_ping_server: ServerProcess, monkeypatch: pytest.MonkeyPatch, keepalive_s: float, kept: bool
) -> None:
    """With its background reader looking in while idle, the session keeps its one socket; left
    unread (the second case, which shows the server really drops a silent client), it is
    dropped, and the next call still works over a new one."""
    monkeypatch.setattr(mymps_magic._session, "KEEPALIVE_S", keepalive_s)
    with Client(host="127.0.0.1", port=fast_ping_server.port, token=fast_ping_server.token) as client:
        client.run(noop)
        first = client.session._ws
        time.sleep(2.0)  # several ping rounds, nothing sent or awaited by the client
        assert client.run(noop) is None
        assert (client.session._ws is first) is kept
