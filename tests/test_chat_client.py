"""`Client.chat` and ``%mymps chat``: the conversation from Python and from a notebook."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator

import pytest

from kit import TinyModels
from mymps_magic import Client, errors
from notebook_kernel import Kernel, ok

MODEL = "chat-client-gpt2"
CONVERSATION = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "Where does the fox run?"},
]


@pytest.fixture(scope="module")
def model(tiny_models: TinyModels, server: object) -> Iterator[str]:
    from kit import ServerProcess

    assert isinstance(server, ServerProcess)
    with Client(port=server.port, token=server.token) as c:
        c.load_model(MODEL, path=str(tiny_models.text_gpt2), progress=False)
        yield MODEL
        c.unload_model(MODEL)


def test_chat_answers_the_reply_and_the_generation_figures(client: Client, model: str) -> None:
    reply = client.chat(model, CONVERSATION, max_new_tokens=8, temperature=0)

    assert reply["message"] == {"role": "assistant", "content": reply["text"]}
    assert reply["tokens_generated"] >= 1 and reply["prompt_tokens"] > 10


def test_a_streamed_chat_gives_the_same_text_piece_by_piece(client: Client, model: str) -> None:
    whole = client.chat(model, CONVERSATION, max_new_tokens=8, temperature=0)

    with client.chat(model, CONVERSATION, stream=True, max_new_tokens=8, temperature=0) as stream:
        pieces = list(stream)

    assert "".join(pieces) == whole["text"]
    assert stream.stats is not None and stream.stats["message"] == whole["message"]


@pytest.mark.parametrize("messages", [[], [{"role": "robot", "content": "hi"}], ["hi"], "hi"])
def test_bad_messages_are_refused_before_anything_is_sent(client: Client, messages: object) -> None:
    with pytest.raises(errors.BadRequestError, match="role': 'user'"):
        client.chat(MODEL, messages)  # type: ignore[arg-type]


def test_the_request_s_own_template_is_used(client: Client, model: str) -> None:
    with pytest.raises(errors.BadRequestError, match="the chat template failed: no system messages here"):
        client.chat(model, CONVERSATION, chat_template="{{ raise_exception('no system messages here') }}")


def test_chat_magic_keeps_the_conversation_until_new(nb: Kernel, model: str) -> None:
    first = ok(nb.execute(f"%mymps chat {model} 'Where does the fox run?' --max-new-tokens 6 --temperature 0"))
    second = ok(nb.execute(f"%mymps chat {model} {shlex.quote('And the dog?')} --max-new-tokens 6 --temperature 0"))

    for run in (first, second):
        assert re.search(r"\[\d+ tokens, [\d.]+ tokens/s, stopped by \w+\]\n$", run.stdout), run.stdout
    kept = ok(nb.execute("print(get_ipython().magics_manager.registry['MympsMagics'].conversations"
                         f"[{model!r}])")).stdout
    assert kept.count("'role': 'user'") == 2 and kept.count("'role': 'assistant'") == 2
    assert "And the dog?" in kept

    ok(nb.execute(f"%mymps chat {model} 'Hello' --new --max-new-tokens 2"))
    kept = ok(nb.execute("print(get_ipython().magics_manager.registry['MympsMagics'].conversations"
                         f"[{model!r}])")).stdout
    assert kept.count("'role': 'user'") == 1 and "Hello" in kept and "fox" not in kept


def test_chat_magic_without_a_message_needs_new(nb: Kernel, model: str) -> None:
    run = nb.execute(f"%mymps chat {model}")
    assert "give the message" in str(run.error) + run.stderr + run.stdout

    cleared = ok(nb.execute(f"%mymps chat {model} --new"))
    assert f"new conversation with {model}" in cleared.stdout.lower()


def test_chat_magic_system_opens_a_new_conversation(nb: Kernel, model: str) -> None:
    ok(nb.execute(f"%mymps chat {model} 'Hi' --new --system 'Be brief.' --max-new-tokens 2"))
    kept = ok(nb.execute("print(get_ipython().magics_manager.registry['MympsMagics'].conversations"
                         f"[{model!r}][:2])")).stdout
    assert kept.startswith("[{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}]")

    run = nb.execute(f"%mymps chat {model} 'Again' --system 'Be long.'")
    assert "add --new" in str(run.error) + run.stderr + run.stdout
