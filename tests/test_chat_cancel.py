"""A chat or an OpenAI completion whose client stops reading, cancels, or goes away stops on the
server at its next token: the device is free again, as for ``/generate``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from websockets.sync.client import connect

from kit import ServerProcess, TinyModels, auth, never_ending_copy, wait_for

MODEL = "cancel-llama"
LONG = {"max_new_tokens": 8192, "temperature": 0}
HELLO = [{"role": "user", "content": "Tell me a long story."}]


@pytest.fixture(scope="module")
def model(http: httpx.Client, tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tiny Llama (with its chat template) that never samples its end token."""
    path = never_ending_copy(tiny_models.text_llama, tmp_path_factory.mktemp("cancel") / "llama")
    assert http.post("/models/load", json={"name": MODEL, "path": str(path)}).status_code == 200
    yield MODEL
    http.delete(f"/models/{MODEL}")


def _generating(http: httpx.Client) -> list[dict[str, Any]]:
    return [job for job in http.get("/jobs").json()["jobs"] if job["model"] == MODEL]


def _stopped(http: httpx.Client) -> None:
    """Wait until the model's generation is off /jobs, and check that it stopped early: the
    progress last seen is far from its 8192 tokens (it did not just run to its end)."""
    last = [0.0]

    def gone() -> bool:
        running = _generating(http)
        if running:
            last[0] = running[0]["progress"] or 0.0
        return not running

    wait_for(gone, "the generation to stop")
    assert last[0] < 0.5, f"the generation ran on to {last[0]:.0%} of its tokens"


def test_ws_chat_cancel_is_answered_by_done_once_stopped(server: ServerProcess, http: httpx.Client,
                                                         model: str) -> None:
    with connect(server.ws_url("/ws/chat"), additional_headers=auth(server.token), proxy=None) as ws:
        ws.send(json.dumps({"model": model, "messages": HELLO, **LONG}))
        for _ in range(3):
            assert json.loads(ws.recv(timeout=60))["type"] == "token"
        ws.send(json.dumps({"type": "cancel"}))
        frames = [json.loads(frame) for frame in ws]

    done = frames[-1]
    assert done["type"] == "done" and done["stop_reason"] == "cancelled"
    assert 3 <= done["tokens_generated"] < 8192
    assert not _generating(http)


def test_ws_chat_stops_when_its_client_disconnects(server: ServerProcess, http: httpx.Client, model: str) -> None:
    with connect(server.ws_url("/ws/chat"), additional_headers=auth(server.token), proxy=None) as ws:
        ws.send(json.dumps({"model": model, "messages": HELLO, **LONG}))
        assert json.loads(ws.recv(timeout=60))["type"] == "token"

    _stopped(http)


def test_an_ndjson_chat_read_in_part_stops_when_closed(server: ServerProcess, http: httpx.Client,
                                                       model: str) -> None:
    with httpx.Client(base_url=server.url, headers=auth(server.token), trust_env=False, timeout=60) as own, \
            own.stream("POST", "/chat", json={"model": model, "messages": HELLO, "stream": True, **LONG}) as answer:
        lines = answer.iter_lines()
        assert json.loads(next(lines))["type"] == "token"

    _stopped(http)


def test_an_openai_stream_closed_early_stops_the_generation(server: ServerProcess, http: httpx.Client,
                                                            model: str) -> None:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0) as ai:
        stream = ai.chat.completions.create(model=model, messages=HELLO,  # type: ignore[arg-type]
                                            max_tokens=8192, temperature=0, stream=True)
        for _, chunk in zip(range(3), stream):
            assert chunk.choices[0].finish_reason is None
        stream.close()

    _stopped(http)
