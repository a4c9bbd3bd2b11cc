"""``wire.ChatRequest``: what the client writes the server reads back, and what it refuses."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mymps_magic import wire

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.mark.parametrize("request_type", [
    wire.ChatRequest((wire.ChatMessage("user", "Hi"),), wire.GenerateRequest("m", "")),
    wire.ChatRequest((wire.ChatMessage("system", "Be brief."), wire.ChatMessage("user", "Hi"),
                      wire.ChatMessage("assistant", "Hello!"), wire.ChatMessage("tool", "42")),
                     wire.GenerateRequest("m", "", 5, 0.0, 0.5, 7, ("\n",), 3, 1.2), "{{ messages }}"),
], ids=repr)
def test_a_chat_request_the_client_writes_reads_back_as_the_same_request(request_type: wire.ChatRequest) -> None:
    sent = json.loads(json.dumps(request_type.to_json()))

    assert "prompt" not in sent
    assert wire.ChatRequest.from_json(sent) == request_type


def test_the_generation_it_runs_is_the_chats_sampling_with_the_templates_prompt() -> None:
    chat = wire.ChatRequest.from_json({"model": "m", "messages": HELLO, "temperature": 0, "max_new_tokens": 3})

    assert chat.generate_request("<|user|>Hello") == wire.GenerateRequest("m", "<|user|>Hello", 3, 0.0)


@pytest.mark.parametrize(("body", "says"), [
    ("not an object", "JSON object"),
    ({"messages": HELLO}, "'model'"),
    ({"model": "m"}, "messages must be a non-empty list"),
    ({"model": "m", "messages": []}, "messages must be a non-empty list"),
    ({"model": "m", "messages": "Hello"}, "messages must be a non-empty list"),
    ({"model": "m", "messages": [{"role": "user"}]}, "messages[0] must be"),
    ({"model": "m", "messages": [{"role": "user", "content": "a", "name": "x"}]}, "messages[0] must be"),
    ({"model": "m", "messages": ["Hello"]}, "messages[0] must be"),
    ({"model": "m", "messages": [*HELLO, {"role": "robot", "content": "a"}]}, "messages[1].role must be one of"),
    ({"model": "m", "messages": [{"role": "user", "content": 3}]}, "messages[0].content must be a string"),
    ({"model": "m", "messages": HELLO * (wire.MAX_MESSAGES + 1)}, "at most"),
    ({"model": "m", "messages": HELLO, "prompt": "p"}, "unknown field(s) 'prompt'"),
    ({"model": "m", "messages": HELLO, "temprature": 1}, "unknown field(s) 'temprature'"),
    ({"model": "m", "messages": HELLO, "temperature": -1}, "temperature must be"),
    ({"model": "m", "messages": HELLO, "top_k": -1}, "top_k must be"),
    ({"model": "m", "messages": HELLO, "max_new_tokens": 0}, "max_new_tokens must be"),
    ({"model": "m", "messages": HELLO, "chat_template": ""}, "chat_template must be"),
])
def test_a_bad_chat_request_is_refused_in_one_line_naming_the_field(body: Any, says: str) -> None:
    with pytest.raises(wire.WireFormatError) as caught:
        wire.ChatRequest.from_json(body)

    assert says in str(caught.value) and "\n" not in str(caught.value)
