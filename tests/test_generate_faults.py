"""Faults of the generation endpoints (issue 10, items 5 and 6): a client that goes away frees
the device within a moment, and a client that sends what it should not gets a clear answer (an
error frame or a close with a code and a reason), never a dropped socket."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from kit import ServerProcess, TinyModels, auth
from mymps_magic import wire
from test_session_bad_input import RawSession

MODEL = "faults-llama"
# Greedy decoding of this prompt on the tiny Llama loops without EOS: it runs to max_new_tokens.
LONG = {"model": MODEL, "prompt": "Machine learning", "max_new_tokens": 8192, "temperature": 0}


@pytest.fixture(scope="module")
def loaded(http: httpx.Client, tiny_models: TinyModels) -> Iterator[None]:
    answer = http.post("/models/load", json={"name": MODEL, "kind": "text", "path": str(tiny_models.text_llama)})
    assert answer.status_code == 200, answer.text
    yield
    http.delete(f"/models/{MODEL}")


def jobs(http: httpx.Client) -> list[dict[str, Any]]:
    return http.get("/jobs").json()["jobs"]  # type: ignore[no-any-return]


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s")
        time.sleep(0.02)
    return value


def assert_device_free_and_healthy(http: httpx.Client) -> None:
    """No job left, the model still loaded, and a short generation runs at once."""
    wait_for(lambda: not jobs(http), 5, "the generation gone from /jobs")
    assert MODEL in http.get("/health").json()["models"]
    short = http.post("/generate", json={**LONG, "max_new_tokens": 3})
    assert short.status_code == 200 and short.json()["tokens_generated"] == 3


def test_a_generate_whose_client_goes_away_is_cancelled(
        server: ServerProcess, http: httpx.Client, loaded: None) -> None:
    """`POST /generate` from a client that then closes its connection (a plain socket: what a
    killed process or a dropped tunnel leaves): the device is free within a moment, not after
    all 8192 tokens."""
    body = json.dumps(LONG).encode()
    request = (f"POST /generate HTTP/1.1\r\nHost: {server.host}\r\nAuthorization: Bearer {server.token}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection((server.host, server.port), timeout=10) as leaving:
        leaving.sendall(request)
        job = wait_for(lambda: next((j for j in jobs(http) if j["model"] == MODEL and j["state"] == "running"), None),
                       30, "the generation running")
    wait_for(lambda: all(j["id"] != job["id"] for j in jobs(http)), 5, "the generation cancelled")
    assert_device_free_and_healthy(http)


def ws(server: ServerProcess) -> Any:
    return connect(server.ws_url("/ws/generate"), additional_headers=auth(server.token), proxy=None, open_timeout=10)


def closed_with(socket: Any) -> tuple[int | None, str]:
    """Read until the server closes; the code and reason of its close frame (None: none sent)."""
    with pytest.raises(ConnectionClosed) as closed:
        for _ in range(100_000):
            socket.recv(timeout=10)
    received = closed.value.rcvd
    return (received.code, received.reason) if received is not None else (None, "")


def test_a_binary_first_frame_gets_an_error_frame(server: ServerProcess, http: httpx.Client, loaded: None) -> None:
    with ws(server) as socket:
        socket.send(json.dumps(LONG).encode())
        answer = json.loads(socket.recv(timeout=10))
        assert answer["type"] == "error" and answer["status"] == 400
        assert "text" in answer["error"] and "\n" not in answer["error"]
        code, _ = closed_with(socket)
        assert code == 1000
    assert_device_free_and_healthy(http)


@pytest.mark.parametrize("second", [json.dumps(LONG), b"\x00binary"], ids=["another-request", "binary"])
def test_a_second_message_mid_generation_cancels_it_and_closes_with_a_reason(
        server: ServerProcess, http: httpx.Client, loaded: None, second: Any) -> None:
    with ws(server) as socket:
        socket.send(json.dumps(LONG))
        assert json.loads(socket.recv(timeout=30))["type"] == "token"
        socket.send(second)
        code, reason = closed_with(socket)
    assert code == wire.CLOSE_PROTOCOL_MISUSE  # not 1008, which clients take for a refused token
    assert reason == "send one request per connection; open a new one for the next generation"
    assert_device_free_and_healthy(http)


def test_a_cancelled_generation_still_queued_gets_its_done_frame(
        server: ServerProcess, http: httpx.Client, loaded: None, tmp_path: Path) -> None:
    """A cell holds the device; a generation queued behind it is cancelled by its client: the
    answer is the documented ``done`` frame (cancelled, no tokens) and a normal close, not an
    error frame, and the job is gone from /jobs."""
    release = tmp_path / "release"
    with RawSession(server) as cell:
        cell.hello()
        cell.send(wire.Frame("cell", 1, {"source": f"import os, time\nwhile not os.path.exists({str(release)!r}):\n"
                                                  "    time.sleep(0.02)\n'released'"}))
        wait_for(lambda: any(j["kind"] == "cell" and j["state"] == "running" for j in jobs(http)), 30, "the cell running")
        with ws(server) as socket:
            socket.send(json.dumps(LONG))
            wait_for(lambda: any(j["kind"] == "generate" and j["state"] == "queued" for j in jobs(http)), 30,
                     "the generation queued")
            socket.send(json.dumps({"type": "cancel"}))
            frame = json.loads(socket.recv(timeout=10))
            assert frame["type"] == "done" and frame["stop_reason"] == "cancelled", frame
            assert frame["tokens_generated"] == 0
            assert closed_with(socket)[0] == 1000
        assert not any(j["kind"] == "generate" for j in jobs(http))
        release.touch()
        assert wire.loads(cell.answer(1).buffers) == "released"
    assert_device_free_and_healthy(http)
