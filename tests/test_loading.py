"""Loading (issue 10, items 12, 13, 14): the kind found from what a source holds, a wrong kind
refused with the one that fits, a loaded name asked for with another kind or dtype refused with a
409, invalid hub ids as clean 4xx answers, and one ``server.log`` line per load and unload.

All through the real server over HTTP, with the kit's tiny models.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from kit import MakeServer, ServerProcess, TinyModels, auth
from mymps_magic import BadRequestError, CancelledError, Client, wire

LOG_WAIT_S = 10.0


def error_of(answer: httpx.Response, status: int) -> str:
    """Assert the status and the one-line ``{"error": ...}`` body; return the message."""
    assert answer.status_code == status, f"expected {status}, got {answer.status_code}: {answer.text[:500]}"
    message = answer.json()["error"]
    assert isinstance(message, str) and message and "\n" not in message, message
    return message


def loaded_kinds(http: httpx.Client) -> dict[str, str]:
    return {m["name"]: m["kind"] for m in http.get("/models").json()}


@pytest.fixture
def unload_after(http: httpx.Client) -> Iterator[list[str]]:
    """Names a test loads; each is unloaded afterwards so the shared server stays as it was."""
    names: list[str] = []
    yield names
    for name in names:
        http.delete(f"/models/{name}")


def sources(tiny: TinyModels) -> dict[str, Path]:
    return {"text": tiny.text_gpt2, "diffusion": tiny.diffusion, "auto": tiny.auto, "torchscript": tiny.torchscript}


# --- item 12: the kind comes from what the source holds ----------------------------------------


@pytest.mark.parametrize("kind", ["text", "diffusion", "auto", "torchscript"])
def test_a_load_without_kind_detects_it_from_the_source(
    http: httpx.Client, tiny_models: TinyModels, unload_after: list[str], kind: str
) -> None:
    name = f"detect-{kind}"
    unload_after.append(name)

    answer = http.post("/models/load", json={"name": name, "path": str(sources(tiny_models)[kind])})

    assert answer.status_code == 200, answer.text
    assert answer.json()["kind"] == kind
    assert loaded_kinds(http)[name] == kind


def test_a_path_as_the_name_with_no_kind_loads_a_diffusion_pipeline(
    http: httpx.Client, tiny_models: TinyModels, unload_after: list[str]
) -> None:
    """The issue's case: ``%mymps load /path/to/pipeline`` without ``--kind``."""
    name = str(tiny_models.diffusion)
    unload_after.append(name)

    answer = http.post("/models/load", json={"name": name})

    assert answer.status_code == 200, answer.text
    assert answer.json()["kind"] == "diffusion"


def test_a_state_dict_without_kind_is_a_checkpoint(
    http: httpx.Client, tiny_models: TinyModels, unload_after: list[str]
) -> None:
    name = "detect-checkpoint"
    unload_after.append(name)
    without_class = http.post("/models/load", json={"name": name, "path": str(tiny_models.checkpoint)})
    assert "model_class" in error_of(without_class, 422)

    answer = http.post("/models/load", json={"name": name, "path": str(tiny_models.checkpoint_safetensors),
                                             "model_class": tiny_models.checkpoint_class})

    assert answer.status_code == 200, answer.text
    assert answer.json()["kind"] == "checkpoint"


@pytest.mark.parametrize(
    ("holds", "asked", "fits"),
    [
        ("diffusion", "text", "diffusion"),
        ("diffusion", "auto", "diffusion"),
        ("torchscript", "text", "torchscript"),
        ("torchscript", "checkpoint", "torchscript"),
        ("auto", "text", "auto"),
        ("text", "diffusion", "text"),
        ("checkpoint", "text", "checkpoint"),
        ("checkpoint", "torchscript", "checkpoint"),
    ],
)
def test_an_explicit_wrong_kind_is_one_line_naming_the_kind_that_fits(
    server: ServerProcess, http: httpx.Client, tiny_models: TinyModels, holds: str, asked: str, fits: str
) -> None:
    path = {**sources(tiny_models), "checkpoint": tiny_models.checkpoint}[holds]
    name = f"wrong-{holds}-as-{asked}"
    body = {"name": name, "path": str(path), "kind": asked, "model_class": tiny_models.checkpoint_class}

    message = error_of(http.post("/models/load", json=body), 400)

    assert f"kind='{fits}'" in message
    assert "sentencepiece" not in message and "JSON" not in message
    assert name not in loaded_kinds(http)
    assert httpx.get(f"{server.url}/health", trust_env=False).status_code == 200


def test_a_causal_lm_may_still_be_loaded_as_auto(
    http: httpx.Client, tiny_models: TinyModels, unload_after: list[str]
) -> None:
    """``auto`` (a bare ``AutoModel``) is a legitimate choice for a causal LM's hidden states."""
    name = "detect-gpt2-as-auto"
    unload_after.append(name)

    answer = http.post("/models/load", json={"name": name, "path": str(tiny_models.text_gpt2), "kind": "auto"})

    assert answer.status_code == 200, answer.text
    assert answer.json()["kind"] == "auto"


def test_a_bert_encoder_is_never_loaded_as_text(http: httpx.Client, tiny_models: TinyModels) -> None:
    """It used to load and then fail in generate with ``KeyError: 'cache'``."""
    name = "detect-bert-as-text"

    message = error_of(http.post("/models/load", json={"name": name, "path": str(tiny_models.auto),
                                                       "kind": "text"}), 400)

    assert "BertModel" in message and "kind='auto'" in message
    generate = http.post("/generate", json={"model": name, "prompt": "hello", "max_new_tokens": 2})
    assert generate.status_code == 404 and "cache" not in generate.text


def _fake_hub_cache(root: Path, repo_id: str, files_from: Path) -> None:
    """Lay out ``files_from`` as huggingface_hub's cache would hold ``repo_id`` after a download."""
    commit = "0" * 40
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(files_from, repo / "snapshots" / commit)


@pytest.mark.slow
def test_a_cached_hub_id_is_detected_from_its_cached_files(
    make_server: MakeServer, tiny_models: TinyModels, tmp_path: Path
) -> None:
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "tiny-org/tiny-diffusion", tiny_models.diffusion)
    _fake_hub_cache(cache, "tiny-org/tiny-bert", tiny_models.auto)
    server = make_server(env={"HF_HUB_CACHE": str(cache)})
    with httpx.Client(base_url=server.url, headers=auth(server.token), timeout=60.0, trust_env=False) as http:
        diffusion = http.post("/models/load", json={"name": "tiny-org/tiny-diffusion"})
        wrong = http.post("/models/load", json={"name": "tiny-org/tiny-bert", "kind": "text"})
        uncached = http.post("/models/load", json={"name": "tiny-org/not-downloaded"})

    assert diffusion.status_code == 200, diffusion.text
    assert diffusion.json()["kind"] == "diffusion"
    assert "kind='auto'" in error_of(wrong, 400)
    # Nothing cached to look at: the default kind (text), which then finds nothing to load.
    assert "tiny-org/not-downloaded" in error_of(uncached, 404)


# --- item 13: a loaded name asked for differently; invalid hub ids -----------------------------


def test_loading_a_loaded_name_with_another_dtype_or_kind_says_to_unload_first(
    http: httpx.Client, tiny_models: TinyModels, unload_after: list[str]
) -> None:
    name = "conflict-gpt2"
    unload_after.append(name)
    body = {"name": name, "path": str(tiny_models.text_gpt2)}
    assert http.post("/models/load", json={**body, "dtype": "float32"}).status_code == 200

    other_dtype = error_of(http.post("/models/load", json={**body, "dtype": "float16"}), 409)
    other_kind = error_of(http.post("/models/load", json={**body, "kind": "auto"}), 409)
    streamed = http.post("/models/load", json={**body, "dtype": "bfloat16"}, headers={"Accept": wire.NDJSON})
    same = http.post("/models/load", json={**body, "dtype": "float32", "kind": "text"})
    unspecified = http.post("/models/load", json={"name": name})

    assert f"`{name}` is loaded as text/float32" in other_dtype
    assert f"DELETE /models/{name}" in other_dtype and f"%mymps unload {name}" in other_dtype
    assert other_dtype.endswith("to load it as float16")
    assert other_kind.endswith("to load it as auto")
    assert "unload it first" in error_of(streamed, 409)
    for answer in (same, unspecified):
        assert answer.status_code == 200, answer.text
        assert answer.json()["already_loaded"] is True
    model = {m["name"]: m for m in http.get("/models").json()}[name]
    assert (model["kind"], model["dtype"]) == ("text", "float32")


def test_the_client_raises_a_bad_request_not_a_cancel_for_a_load_that_conflicts(
    client: Client, tiny_models: TinyModels, unload_after: list[str]
) -> None:
    """A 409 that asks to unload first is a `BadRequestError` to the user, not the
    `CancelledError` of a 409 for a cancelled job."""
    name = "conflict-client-gpt2"
    unload_after.append(name)
    client.load_model(name, path=str(tiny_models.text_gpt2), dtype="float32", progress=False)
    with pytest.raises(BadRequestError, match="unload it first") as caught:
        client.load_model(name, path=str(tiny_models.text_gpt2), dtype="float16", progress=False)
    assert caught.value.status_code == 409
    assert not isinstance(caught.value, CancelledError)


@pytest.mark.parametrize("kind", ["diffusion", "text", "auto", None])
@pytest.mark.parametrize("hub_id", ["bad id!!", "a/b/c", "x--y"])
def test_an_invalid_hub_id_is_a_404_for_every_kind(
    server: ServerProcess, http: httpx.Client, hub_id: str, kind: str | None
) -> None:
    message = error_of(http.post("/models/load", json={"name": hub_id, "kind": kind}), 404)

    assert hub_id in message and "hub id" in message
    assert httpx.get(f"{server.url}/health", trust_env=False).status_code == 200


# --- item 14 (loads and unloads): one server.log line each --------------------------------------


def _log_line(server: ServerProcess, pattern: str) -> str:
    """The first ``server.log`` line matching ``pattern``, waited for (the log is written by the
    worker thread, maybe just after the answer left)."""
    deadline = time.monotonic() + LOG_WAIT_S
    while True:
        log = server.home / "server.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        found = [line for line in text.splitlines() if re.search(pattern, line)]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no line matching {pattern!r} in server.log:\n{text[-3000:]}"
        time.sleep(0.05)


def test_every_load_unload_and_failed_load_is_one_log_line(
    server: ServerProcess, http: httpx.Client, tiny_models: TinyModels
) -> None:
    name = "logged-torchscript"
    loaded = http.post("/models/load", json={"name": name, "path": str(tiny_models.torchscript)})
    assert loaded.status_code == 200, loaded.text
    size = {m["name"]: m for m in http.get("/models").json()}[name]["bytes"]
    assert http.delete(f"/models/{name}").status_code == 200
    failed = http.post("/models/load", json={"name": "logged-missing", "path": "/no/such/model.pt"})
    assert failed.status_code == 404

    load_line = _log_line(server, rf"kernel_server\.registry: loaded {name} ")
    unload_line = _log_line(server, rf"kernel_server\.registry: unloaded {name} ")
    failed_line = _log_line(server, r"kernel_server\.registry: could not load logged-missing")

    for line in (load_line, unload_line):
        assert "INFO" in line and "(torchscript, float32)" in line
        assert re.search(r"in \d+\.\d+ s", line) and f"{size} bytes" in line
    assert "/no/such/model.pt" in failed_line and "does not exist" in failed_line
    assert server.token not in (server.home / "server.log").read_text()


# --- item 21 (last clause): a generation cut by the model's context says so ---------------------


@pytest.fixture(scope="module")
def short_context_gpt2(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kit's tokenizer with a GPT-2 of 24 positions and no reachable EOS: every generation
    runs until its budget or the context ends it."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = tmp_path_factory.mktemp("gpt2-24-positions")
    for file in tiny_models.text_gpt2.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(file, directory / file.name)
    vocab = json.loads((tiny_models.text_gpt2 / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=24, vocab_size=vocab,
                        bos_token_id=0, eos_token_id=vocab + 1)  # an id no sample can take
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


def test_a_generation_cut_by_the_context_says_the_context_was_the_limit(
    http: httpx.Client, short_context_gpt2: Path, unload_after: list[str]
) -> None:
    name = "gpt2-24"
    unload_after.append(name)
    assert http.post("/models/load", json={"name": name, "path": str(short_context_gpt2)}).status_code == 200
    body = {"model": name, "prompt": "Once upon a time", "temperature": 0}

    cut = http.post("/generate", json={**body, "max_new_tokens": 100}).json()
    budget = http.post("/generate", json={**body, "max_new_tokens": 3}).json()

    assert cut["stop_reason"] == "max_tokens" and cut["limit"] == "context"
    assert "24 tokens" in cut["message"] and "context" in cut["message"]
    assert cut["tokens_generated"] < 24
    assert budget["stop_reason"] == "max_tokens" and budget["limit"] == "max_new_tokens"
    assert budget["tokens_generated"] == 3 and "message" not in budget
