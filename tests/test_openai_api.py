"""The OpenAI-compatible endpoints (``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``)
driven by the official ``openai`` package, pointed at the real server with its token as the key."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from kit import ServerProcess, TinyModels, wait_for

CHAT = "openai-gpt2"
PLAIN = "openai-plain"
CONVERSATION: list[Any] = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "Where does the fox run?"},
]
PROMPT = "The quick brown fox"
TOKENS = 12


@pytest.fixture(scope="module")
def models(http: httpx.Client, tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The tiny GPT-2 with its chat template, and the same model without one."""
    from kernel_server.tinymodels import build_tiny_text_model

    plain = build_tiny_text_model(tmp_path_factory.mktemp("plain") / "gpt2", chat_template=False)
    for name, path in {CHAT: tiny_models.text_gpt2, PLAIN: plain}.items():
        assert http.post("/models/load", json={"name": name, "path": str(path)}).status_code == 200
    yield
    for name in (CHAT, PLAIN):
        http.delete(f"/models/{name}")


@pytest.fixture
def ai(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0) as client:
        yield client


def test_models_lists_the_loaded_text_models(ai: openai.OpenAI, models: None) -> None:
    listed = {model.id: model for model in ai.models.list()}

    assert {CHAT, PLAIN} <= set(listed)
    assert listed[CHAT].object == "model" and listed[CHAT].owned_by == "mymps" and listed[CHAT].created > 0


def test_a_chat_completion_is_what_chat_answers(ai: openai.OpenAI, http: httpx.Client, models: None) -> None:
    expected = http.post("/chat", json={"model": CHAT, "messages": CONVERSATION, "max_new_tokens": TOKENS,
                                        "temperature": 0}).json()

    completion = ai.chat.completions.create(model=CHAT, messages=CONVERSATION, max_tokens=TOKENS, temperature=0)

    (choice,) = completion.choices
    assert choice.message.role == "assistant" and choice.message.content == expected["text"]
    assert choice.finish_reason == ("length" if expected["tokens_generated"] == TOKENS else "stop")
    assert completion.object == "chat.completion" and completion.model == CHAT and completion.id
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == expected["prompt_tokens"]
    assert completion.usage.completion_tokens == expected["tokens_generated"]
    assert completion.usage.total_tokens == expected["prompt_tokens"] + expected["tokens_generated"]


def test_a_streamed_chat_completion_sends_the_same_text_then_the_usage(ai: openai.OpenAI, models: None) -> None:
    whole = ai.chat.completions.create(model=CHAT, messages=CONVERSATION, max_tokens=TOKENS, temperature=0)

    chunks = list(ai.chat.completions.create(model=CHAT, messages=CONVERSATION, max_tokens=TOKENS, temperature=0,
                                             stream=True, stream_options={"include_usage": True}))

    *pieces, usage = chunks
    assert all(chunk.object == "chat.completion.chunk" and chunk.id == chunks[0].id for chunk in chunks)
    assert pieces[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in pieces) == whole.choices[0].message.content
    assert pieces[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert usage.choices == [] and usage.usage == whole.usage


def test_max_completion_tokens_and_sampling_fields_are_taken(ai: openai.OpenAI, models: None) -> None:
    greedy = ai.chat.completions.create(model=CHAT, messages=CONVERSATION, max_tokens=TOKENS, temperature=0)

    top_one = ai.chat.completions.create(model=CHAT, messages=CONVERSATION, max_completion_tokens=TOKENS,
                                         temperature=1.5, top_p=1.0, seed=1, stop="zebra",
                                         extra_body={"top_k": 1, "repetition_penalty": 1.0})

    assert top_one.choices[0].message.content == greedy.choices[0].message.content


def test_a_completion_is_what_generate_answers(ai: openai.OpenAI, http: httpx.Client, models: None,
                                              tiny_models: TinyModels) -> None:
    from transformers import AutoTokenizer

    prompt_tokens = len(AutoTokenizer.from_pretrained(tiny_models.text_gpt2)(PROMPT).input_ids)
    expected = http.post("/generate", json={"model": CHAT, "prompt": PROMPT, "max_new_tokens": TOKENS,
                                            "temperature": 0}).json()

    completion = ai.completions.create(model=CHAT, prompt=PROMPT, max_tokens=TOKENS, temperature=0)

    (choice,) = completion.choices
    assert completion.object == "text_completion" and choice.text == expected["text"]
    assert choice.finish_reason == ("length" if expected["tokens_generated"] == TOKENS else "stop")
    assert completion.usage is not None and completion.usage.completion_tokens == expected["tokens_generated"]
    assert completion.usage.prompt_tokens == prompt_tokens
    assert completion.usage.total_tokens == prompt_tokens + expected["tokens_generated"]


def test_a_streamed_completion_sends_the_same_text(ai: openai.OpenAI, models: None) -> None:
    whole = ai.completions.create(model=CHAT, prompt=PROMPT, max_tokens=TOKENS, temperature=0)

    chunks = list(ai.completions.create(model=CHAT, prompt=PROMPT, max_tokens=TOKENS, temperature=0, stream=True))

    assert "".join(chunk.choices[0].text for chunk in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_a_model_that_is_not_loaded_is_openais_not_found(ai: openai.OpenAI, models: None) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        ai.chat.completions.create(model="nope", messages=CONVERSATION)

    assert "'nope' is not loaded" in caught.value.message
    assert caught.value.code == "model_not_found"


@pytest.mark.parametrize(("create", "says"), [
    (lambda ai: ai.chat.completions.create(model=CHAT, messages=[]), "messages"),
    (lambda ai: ai.chat.completions.create(model=CHAT, messages=[{"role": "robot", "content": "hi"}]), "role"),
    (lambda ai: ai.chat.completions.create(model=CHAT, messages=CONVERSATION, n=2), "n"),
    (lambda ai: ai.chat.completions.create(model=CHAT, messages=CONVERSATION, max_tokens=0), "max_tokens"),
    (lambda ai: ai.chat.completions.create(model=PLAIN, messages=CONVERSATION), "no chat template"),
    (lambda ai: ai.completions.create(model=CHAT, prompt=["one", "two"]), "prompt"),
    (lambda ai: ai.chat.completions.create(model=CHAT, messages=CONVERSATION, stream=True), "no"),
], ids=["empty messages", "bad role", "n=2", "max_tokens=0", "no template", "two prompts", "stream ok"])
def test_bad_input_is_an_openai_bad_request_and_the_server_stays_up(
        ai: openai.OpenAI, models: None, create: Any, says: str) -> None:
    if says == "no":  # the same call done well streams: the server is fine after the others
        assert list(create(ai))
        return
    with pytest.raises(openai.BadRequestError) as caught:
        create(ai)

    assert says in caught.value.message and "\n" not in caught.value.message
    assert caught.value.type == "invalid_request_error"


def test_errors_have_openais_shape(server: ServerProcess, http: httpx.Client, models: None) -> None:
    answer = http.post("/v1/chat/completions", json={"model": "nope", "messages": CONVERSATION})

    assert answer.status_code == 404
    error = answer.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["code"] == "model_not_found"


def test_a_wrong_key_is_refused(server: ServerProcess, models: None) -> None:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0) as wrong, \
            pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()

    assert "token" in caught.value.message
    assert caught.value.code == "invalid_api_key"


def test_keep_alive_in_extra_body_unloads_the_model_once_answered(
        ai: openai.OpenAI, http: httpx.Client, tiny_models: TinyModels) -> None:
    assert http.post("/models/load", json={"name": "openai-brief", "path": str(tiny_models.text_gpt2)}).status_code \
        == 200

    ai.completions.create(model="openai-brief", prompt=PROMPT, max_tokens=2, extra_body={"keep_alive": 0})

    wait_for(lambda: "openai-brief" not in http.get("/health").json()["models"], "openai-brief unloaded")


def test_a_stream_that_fails_raises_openais_error_with_the_servers_line(ai: openai.OpenAI, models: None) -> None:
    stream = ai.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "fox " * 300}],
                                        stream=True)

    with pytest.raises(openai.APIError, match="shorten the prompt"):
        list(stream)


def test_a_chat_template_in_extra_body_serves_a_model_without_one(ai: openai.OpenAI, models: None) -> None:
    from kernel_server.tinymodels import CHAT_TEMPLATE

    with_own = ai.chat.completions.create(model=CHAT, messages=CONVERSATION, max_tokens=TOKENS, temperature=0)

    given = ai.chat.completions.create(model=PLAIN, messages=CONVERSATION, max_tokens=TOKENS, temperature=0,
                                       extra_body={"chat_template": CHAT_TEMPLATE})

    assert given.choices[0].message.content == with_own.choices[0].message.content
