"""A client with no server behind its port says how to fix the link, for every transport."""

from __future__ import annotations

import asyncio
import builtins
from typing import Iterator

import pytest

from kit import free_port
from mymps_magic import Client, ConnectionError


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
