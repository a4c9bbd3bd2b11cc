"""The tokenizer of a loaded text model in remote code (issue 12, item 6): ``tokenizers[name]``
beside ``models[name]``, so the Hugging Face docs' ``generate`` example runs in a remote cell
without loading the tokenizer again. Through the real shared ``server`` and a real `Client`.
"""

from __future__ import annotations

from typing import Iterator

import pytest

from kit import ServerProcess, TinyModels
from mymps_magic import Client
from mymps_magic.errors import RemoteError

TEXT = "tokenizers-llama"
NET = "tokenizers-net"


@pytest.fixture(scope="module")
def loaded(server: ServerProcess, tiny_models: TinyModels) -> Iterator[Client]:
    """A client on the shared server with the tiny Llama (text) and a checkpoint net loaded."""
    with Client(host="127.0.0.1", port=server.port, token=server.token) as client:
        client.load_model(TEXT, kind="text", path=str(tiny_models.text_llama), progress=False)
        client.load_model(NET, kind="checkpoint", path=str(tiny_models.checkpoint),
                          model_class=tiny_models.checkpoint_class, progress=False)
        yield client
        client.unload_model(TEXT)
        client.unload_model(NET)


def test_the_hugging_face_generate_example_runs_with_the_loaded_tokenizer(loaded: Client, tiny_models: TinyModels) -> None:
    from transformers import AutoTokenizer

    text = loaded.run_cell(
        f"name = {TEXT!r}\n"
        "inputs = tokenizers[name]('hello world', return_tensors='pt').to(DEVICE)\n"
        "out = models[name].generate(**inputs, max_new_tokens=5, do_sample=False)\n"
        "tokenizers[name].decode(out[0])")
    local = AutoTokenizer.from_pretrained(str(tiny_models.text_llama))
    prompt_ids = local("hello world")["input_ids"]
    ids = local(text, add_special_tokens=False)["input_ids"]
    assert isinstance(text, str) and text.startswith(local.decode(prompt_ids)), text
    assert len(ids) > len(prompt_ids), f"no generated tokens after the prompt: {text!r}"


def test_tokenizers_lists_the_text_models_only(loaded: Client) -> None:
    names, has_net, kind = loaded.run_cell(
        f"list(tokenizers), {NET!r} in tokenizers, type(tokenizers[{TEXT!r}]).__name__")
    assert TEXT in names and NET not in names and has_net is False
    assert "Tokenizer" in kind


def test_a_model_without_a_tokenizer_is_a_key_error_that_says_why(loaded: Client) -> None:
    with pytest.raises(RemoteError) as caught:
        loaded.run_cell(f"tokenizers[{NET!r}]")
    assert caught.value.ename == "KeyError"
    assert "has no tokenizer" in str(caught.value) and TEXT in str(caught.value)
