"""A client with no server behind its port says how to fix the link, for every transport."""

from __future__ import annotations

import asyncio
import builtins
import socket
import threading
from typing import Iterator

import pytest

from mymps_magic import Client, ConnectionError
from mymps_magic.cli.localserver import free_port


@pytest.fixture
def nowhere() -> Iterator[Client]:
    # A port that was free a moment ago: nothing listens there, so connecting is refused at once.
    with Client("127.0.0.1", free_port(), token="t") as client:
        yield client


def _assert_says_how_to_fix(err: BaseException, client: Client) -> None:
    message = str(err)
    assert f"127.0.0.1:{client.port}" in message
    assert "`mymps tunnel`" in message and "`mymps serve`" in message
    assert isinstance(err, builtins.ConnectionError)


def test_rest_call_raises_connection_error(nowhere: Client) -> None:
    with pytest.raises(ConnectionError) as info:
        nowhere.health()
    _assert_says_how_to_fix(info.value, nowhere)


def test_stream_raises_connection_error(nowhere: Client) -> None:
    with pytest.raises(ConnectionError) as info:
        next(iter(nowhere.stream_generate("m", "p")))
    _assert_says_how_to_fix(info.value, nowhere)


def test_async_stream_raises_connection_error(nowhere: Client) -> None:
    async def use() -> None:
        async with nowhere.stream_generate("m", "p") as stream:
            async for _ in stream:
                pass

    with pytest.raises(ConnectionError) as info:
        asyncio.run(use())
    _assert_says_how_to_fix(info.value, nowhere)


@pytest.mark.parametrize("answer", [b"", b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{\"up"],
                         ids=["no-answer", "answer-cut-short"])
def test_an_upload_whose_answer_is_cut_off_raises_connection_error(answer: bytes) -> None:
    """A large value's upload (`PUT /session/{id}/upload`) that loses its link mid-answer is a
    ConnectionError, which the session retries, never a raw http.client exception."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve_once() -> None:
        conn, _ = listener.accept()
        with conn:
            received = b""
            while b"\r\n\r\n" not in received or not received.endswith(b"x" * 16):
                received += conn.recv(65536)
            conn.sendall(answer)

    server = threading.Thread(target=serve_once, daemon=True)
    server.start()
    with Client("127.0.0.1", port, token="t") as client, pytest.raises(ConnectionError) as info:
        client._connection.put_stream("/session/s/upload", [b"x" * 16])
    server.join(10)
    listener.close()
    _assert_says_how_to_fix(info.value, client)
