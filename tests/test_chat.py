"""``POST /chat`` and ``/ws/chat``: a conversation through the model's chat template, answered
as ``/generate`` answers, streamed as ``/ws/generate`` streams, over a real server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from kit import ServerProcess, TinyModels, auth, wait_for

CHAT = "chat-gpt2"
PLAIN = "chat-plain"
IMAGE = "chat-ddpm"
CONVERSATION = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "Where does the fox run?"},
]
GREEDY = {"max_new_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module")
def models(http: httpx.Client, tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The tiny GPT-2 (its tokenizer has a chat template), the same model without one, and a
    diffusion pipeline; unloaded when the module ends."""
    from kernel_server.tinymodels import build_tiny_text_model

    plain = build_tiny_text_model(tmp_path_factory.mktemp("plain") / "gpt2", chat_template=False)
    specs = {CHAT: tiny_models.text_gpt2, PLAIN: plain, IMAGE: tiny_models.diffusion}
    for name, path in specs.items():
        assert http.post("/models/load", json={"name": name, "path": str(path)}).status_code == 200
    yield
    for name in specs:
        http.delete(f"/models/{name}")


def _templated(model: Path, messages: list[dict[str, str]]) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def test_chat_answers_what_generate_answers_for_the_prompt_the_template_writes(
        http: httpx.Client, models: None, tiny_models: TinyModels) -> None:
    prompt = _templated(tiny_models.text_gpt2, CONVERSATION)
    assert prompt.startswith("<|system|>\nYou answer in one line.") and prompt.endswith("<|assistant|>\n")
    expected = http.post("/generate", json={"model": CHAT, "prompt": prompt, **GREEDY}).json()

    answer = http.post("/chat", json={"model": CHAT, "messages": CONVERSATION, **GREEDY})

    assert answer.status_code == 200, answer.text
    chat = answer.json()
    assert chat["text"] == expected["text"]
    assert chat["message"] == {"role": "assistant", "content": expected["text"]}
    assert chat["tokens_generated"] == expected["tokens_generated"]
    assert chat["stop_reason"] == expected["stop_reason"]
    assert chat["prompt_tokens"] > 10


def test_chat_takes_the_sampling_fields_of_generate(http: httpx.Client, models: None) -> None:
    """``top_k=1`` leaves one token to sample: the greedy answer, whatever the temperature."""
    greedy = http.post("/chat", json={"model": CHAT, "messages": CONVERSATION, **GREEDY}).json()

    sampled = http.post("/chat", json={"model": CHAT, "messages": CONVERSATION, "max_new_tokens": 12,
                                       "temperature": 1.5, "top_k": 1, "repetition_penalty": 1.0,
                                       "seed": 3, "stop": ["zebra"]})

    assert sampled.status_code == 200, sampled.text
    assert sampled.json()["text"] == greedy["text"]


def _ndjson(http: httpx.Client, body: dict[str, Any], headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    with http.stream("POST", "/chat", json=body, headers=headers) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in answer.iter_lines() if line]


@pytest.mark.parametrize("ask", ["stream", "accept"])
def test_chat_streams_ndjson_token_lines_then_done(http: httpx.Client, models: None, ask: str) -> None:
    body = {"model": CHAT, "messages": CONVERSATION, **GREEDY}
    expected = http.post("/chat", json=body).json()

    if ask == "stream":
        lines = _ndjson(http, {**body, "stream": True})
    else:
        lines = _ndjson(http, body, {"accept": "application/x-ndjson"})

    *tokens, done = lines
    assert tokens and all(line["type"] == "token" for line in tokens)
    assert "".join(line["text"] for line in tokens) == expected["text"]
    assert done["type"] == "done"
    assert done["message"] == expected["message"]
    assert done["tokens_generated"] == expected["tokens_generated"]


def _ws_chat(server: ServerProcess, body: Any) -> list[dict[str, Any]]:
    with connect(server.ws_url("/ws/chat"), additional_headers=auth(server.token), proxy=None) as ws:
        ws.send(body if isinstance(body, str) else json.dumps(body))
        return [json.loads(frame) for frame in ws]


def test_ws_chat_streams_the_same_frames_as_ws_generate(
        server: ServerProcess, http: httpx.Client, models: None) -> None:
    body = {"model": CHAT, "messages": CONVERSATION, **GREEDY}
    expected = http.post("/chat", json=body).json()

    *tokens, done = _ws_chat(server, body)

    assert "".join(frame["text"] for frame in tokens) == expected["text"]
    assert done["type"] == "done" and done["tokens_generated"] == expected["tokens_generated"]


def test_a_model_without_a_chat_template_is_a_400_that_says_how_to_give_one(
        http: httpx.Client, models: None) -> None:
    answer = http.post("/chat", json={"model": PLAIN, "messages": CONVERSATION, **GREEDY})

    assert answer.status_code == 400
    error = answer.json()["error"]
    assert "no chat template" in error and "chat_template" in error and "\n" not in error


def test_a_chat_template_in_the_request_serves_a_model_without_one(http: httpx.Client, models: None) -> None:
    from kernel_server.tinymodels import CHAT_TEMPLATE

    with_own = http.post("/chat", json={"model": CHAT, "messages": CONVERSATION, **GREEDY}).json()

    answer = http.post("/chat", json={"model": PLAIN, "messages": CONVERSATION, "chat_template": CHAT_TEMPLATE,
                                      **GREEDY})

    assert answer.status_code == 200, answer.text
    assert answer.json()["text"] == with_own["text"]  # the same weights, the same prompt


@pytest.mark.parametrize(("body", "status", "says"), [
    ({"model": "nope", "messages": CONVERSATION}, 404, "not loaded"),
    ({"model": IMAGE, "messages": CONVERSATION}, 400, "diffusion model"),
    ({"model": CHAT, "messages": []}, 422, "messages"),
    ({"model": CHAT, "messages": [{"role": "robot", "content": "hi"}]}, 422, "role"),
    ({"model": CHAT, "messages": CONVERSATION, "max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"model": CHAT, "messages": CONVERSATION, "prompt": "hi"}, 422, "prompt"),
    ({"model": CHAT, "messages": CONVERSATION, "chat_template": "{% for %}"}, 400, "chat template"),
    ({"model": CHAT, "messages": CONVERSATION, "chat_template": "{{ raise_exception('no system') }}"}, 400,
     "no system"),
    ({"model": CHAT, "messages": CONVERSATION, "chat_template": "{{ 1 / 0 }}"}, 400, "ZeroDivisionError"),
    ({"model": CHAT, "messages": CONVERSATION, "keep_alive": "soon"}, 422, "keep_alive"),
    ({"model": CHAT, "messages": CONVERSATION, "stop": ["x"] * 17}, 422, "stop"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "fox " * 300}]}, 400, "shorten the prompt"),
])
def test_bad_chat_requests_are_one_line_errors_and_the_model_stays_loaded(
        http: httpx.Client, server: ServerProcess, models: None, body: dict[str, Any], status: int,
        says: str) -> None:
    answer = http.post("/chat", json=body)

    assert answer.status_code == status, answer.text
    assert says in answer.json()["error"] and "\n" not in answer.json()["error"]
    assert http.post("/chat", json={"model": CHAT, "messages": CONVERSATION, **GREEDY}).status_code == 200
    with connect(server.ws_url("/ws/chat"), additional_headers=auth(server.token), proxy=None) as ws:
        ws.send(json.dumps(body))
        frame = json.loads(ws.recv(timeout=30))
    assert frame["type"] == "error" and frame["status"] == status and says in frame["error"]


def test_ws_chat_refuses_a_first_frame_that_is_not_json(server: ServerProcess, models: None) -> None:
    (frame,) = _ws_chat(server, "hello")

    assert frame["type"] == "error" and frame["status"] == 400 and "JSON" in frame["error"]


def test_a_chat_with_keep_alive_zero_unloads_the_model_once_answered(
        http: httpx.Client, tiny_models: TinyModels) -> None:
    assert http.post("/models/load", json={"name": "chat-brief", "path": str(tiny_models.text_gpt2)}).status_code == 200

    answer = http.post("/chat", json={"model": "chat-brief", "messages": CONVERSATION, "keep_alive": 0, **GREEDY})

    assert answer.status_code == 200, answer.text
    wait_for(lambda: "chat-brief" not in http.get("/health").json()["models"], "chat-brief unloaded")


def test_openapi_shows_chat_and_its_fields(http: httpx.Client) -> None:
    document = http.get("/openapi.json").json()

    assert {"/chat", "/v1/models", "/v1/chat/completions", "/v1/completions"} <= set(document["paths"])
    fields = document["components"]["schemas"]["ChatBody"]["properties"]
    assert {"model", "messages", "chat_template", "stream", "max_new_tokens", "temperature", "top_p", "top_k",
            "repetition_penalty", "seed", "stop", "keep_alive"} <= set(fields)
    assert fields["max_new_tokens"]["default"] == 64 and fields["max_new_tokens"]["maximum"] == 8192


def test_a_streamed_chat_that_fails_ends_with_an_error_line(http: httpx.Client, models: None) -> None:
    too_long = [{"role": "user", "content": "fox " * 300}]

    *_, last = _ndjson(http, {"model": CHAT, "messages": too_long, "stream": True})

    assert last["type"] == "error" and last["status"] == 400 and "shorten the prompt" in last["error"]
