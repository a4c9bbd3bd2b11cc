"""Leaving a `TokenStream` early (issue 10, items 9 and 21): by the time the loop or the ``with``
block is left, the server no longer lists the generation in ``/jobs``, and ``stream.stats`` says
what happened (the tokens generated so far, ``stop_reason: "cancelled"``) instead of ``None``.

Each case leaves several streams in a row: a stream whose close returned while its job still ran
shows up in the very next ``jobs()`` call (one round trip on loopback), so one round is a weak
check and a few make a race visible on any machine.
"""

from __future__ import annotations

import asyncio
import json
from typing import Iterator

import pytest
from websockets.exceptions import ConnectionClosedOK
from websockets.sync.client import connect

from kit import ServerProcess, TinyModels, auth
from mymps_magic import Client

LLAMA = "stream-exit-llama"
LONG = {"max_new_tokens": 4000, "temperature": 0.0}
ROUNDS = 4


@pytest.fixture(scope="module")
def llama(server: ServerProcess, tiny_models: TinyModels) -> Iterator[str]:
    with Client(host="127.0.0.1", port=server.port, token=server.token) as c:
        c.load_model(LLAMA, path=str(tiny_models.text_llama), progress=False)
        yield LLAMA
        c.unload_model(LLAMA)


def generations(c: Client) -> list[dict[str, object]]:
    return [job for job in c.jobs() if job.get("model") == LLAMA]


def assert_cancelled(stats: dict[str, object] | None, pieces: int) -> None:
    assert stats is not None, "stats say how a stream left early ended"
    assert stats["stop_reason"] == "cancelled", stats
    assert isinstance(stats["tokens_generated"], int) and stats["tokens_generated"] >= pieces >= 1, stats
    assert stats["tokens_generated"] < LONG["max_new_tokens"], stats


def test_break_stops_the_job_before_the_loop_is_left(client: Client, llama: str) -> None:
    for _ in range(ROUNDS):
        stream = client.stream_generate(llama, "Machine learning", **LONG)
        pieces = 0
        for _piece in stream:
            pieces += 1
            if pieces == 3:
                break
        assert generations(client) == [], "the generation is gone from /jobs once the loop is left"
        assert_cancelled(stream.stats, pieces)


def test_leaving_the_with_block_stops_the_job(client: Client, llama: str) -> None:
    for _ in range(ROUNDS):
        with client.stream_generate(llama, "Machine learning", **LONG) as stream:
            first = next(stream)
        assert first
        assert generations(client) == []
        assert_cancelled(stream.stats, 1)


def test_an_error_in_the_loop_stops_the_job(client: Client, llama: str) -> None:
    stream = client.stream_generate(llama, "Machine learning", **LONG)
    with pytest.raises(ZeroDivisionError):
        for _piece in stream:
            1 / 0  # noqa: B018  # the user's own bug, mid-stream
    assert generations(client) == []
    assert_cancelled(stream.stats, 1)


def test_async_with_block_stops_the_job(client: Client, llama: str) -> None:
    async def leave_early() -> dict[str, object] | None:
        async with client.stream_generate(llama, "Machine learning", **LONG) as stream:
            async for _piece in stream:
                break
        return stream.stats

    for _ in range(ROUNDS):
        stats = asyncio.run(leave_early())
        assert generations(client) == []
        assert_cancelled(stats, 1)


def test_a_stream_read_to_the_end_keeps_the_servers_figures(client: Client, llama: str) -> None:
    with client.stream_generate(llama, "Machine learning", max_new_tokens=12, temperature=0.0) as stream:
        text = "".join(stream)
    assert text
    assert stream.stats is not None and stream.stats["stop_reason"] == "max_tokens", stream.stats
    assert stream.stats["tokens_generated"] == 12
    stream.close()  # closing a finished stream changes nothing
    assert stream.stats["stop_reason"] == "max_tokens"


def test_the_cancel_message_is_answered_by_done_once_the_job_is_gone(server: ServerProcess, client: Client,
                                                                     llama: str) -> None:
    """The protocol under the client: ``{"type": "cancel"}`` gets the ``done`` frame, sent only
    after the job left /jobs, then a normal close."""
    with connect(server.ws_url(), additional_headers=auth(server.token), proxy=None) as ws:
        ws.send(json.dumps({"model": llama, "prompt": "Machine learning", **LONG}))
        assert json.loads(ws.recv(timeout=30))["type"] == "token"
        ws.send(json.dumps({"type": "cancel"}))
        frame = {"type": "token"}
        while frame["type"] == "token":
            frame = json.loads(ws.recv(timeout=30))
        assert generations(client) == [], "off /jobs before the done frame goes out"
        assert frame["type"] == "done" and frame["stop_reason"] == "cancelled", frame
        assert 1 <= frame["tokens_generated"] < LONG["max_new_tokens"]
        with pytest.raises(ConnectionClosedOK):
            ws.recv(timeout=30)
