"""What a request may say about loading and decoding: dtype spellings, unknown fields listed in
``ignored``, ``top_k`` and ``repetition_penalty``, and the model's own ``generation_config`` when
the request says nothing, each checked the way a Hugging Face user would: against
``model.generate`` on the same tiny model, in this process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from websockets.sync.client import connect

from kit import ServerProcess, TinyModels, auth
from mymps_magic import Client

LLAMA = "settings-llama"
SAMPLING_CONFIG = "settings-llama-top-k-1"
PROMPT = "Machine learning"
TOKENS = 12


def _sampling_copy(model: Path, into: Path) -> Path:
    """A copy of the tiny model whose generation_config samples with top_k=1 (so: greedy)."""
    import shutil

    shutil.copytree(model, into)
    file = into / "generation_config.json"
    config = json.loads(file.read_text()) if file.exists() else {}
    file.write_text(json.dumps({**config, "do_sample": True, "temperature": 1.5, "top_k": 1}))
    return into


@pytest.fixture(scope="module")
def loaded(http: httpx.Client, tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    sampling = _sampling_copy(tiny_models.text_llama, tmp_path_factory.mktemp("sampling") / "llama")
    for name, path in ((LLAMA, tiny_models.text_llama), (SAMPLING_CONFIG, sampling)):
        answer = http.post("/models/load", json={"name": name, "kind": "text", "path": str(path)})
        assert answer.status_code == 200, answer.text
    yield
    for name in (LLAMA, SAMPLING_CONFIG):
        http.delete(f"/models/{name}")


def _hf_generate(path: Path, **settings: Any) -> str:
    """What ``model.generate`` makes of PROMPT on the model at ``path``, in this process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=TOKENS, attention_mask=torch.ones_like(ids), **settings)
    return str(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


# --- the model's generation_config decides what the request leaves out ----------------------------


def test_a_request_without_sampling_settings_decodes_as_model_generate_does(
        client: Client, loaded: None, tiny_models: TinyModels) -> None:
    """The tiny model's config says nothing about sampling: transformers decodes greedily."""
    answer = client.generate(LLAMA, PROMPT, max_new_tokens=TOKENS)

    assert answer["text"] == _hf_generate(tiny_models.text_llama)
    assert answer["text"] == client.generate(LLAMA, PROMPT, max_new_tokens=TOKENS, temperature=0)["text"]


def test_the_models_generation_config_sampling_settings_are_used(
        client: Client, loaded: None, tiny_models: TinyModels) -> None:
    """A config that samples with top_k=1 picks the likeliest token every time, at any seed."""
    greedy = client.generate(LLAMA, PROMPT, max_new_tokens=TOKENS, temperature=0)["text"]

    for seed in (1, 2, 3):
        assert client.generate(SAMPLING_CONFIG, PROMPT, max_new_tokens=TOKENS, seed=seed)["text"] == greedy
    # a request's own top_k overrides the config's: sampling at temperature 1.5 from all tokens
    # differs from greedy for at least one of a few seeds
    free = {client.generate(SAMPLING_CONFIG, PROMPT, max_new_tokens=TOKENS, seed=seed, top_k=0)["text"]
            for seed in (1, 2, 3)}
    assert free != {greedy}


# --- top_k and repetition_penalty ------------------------------------------------------------------


def test_top_k_1_is_greedy_whatever_the_temperature(client: Client, loaded: None) -> None:
    greedy = client.generate(LLAMA, PROMPT, max_new_tokens=TOKENS, temperature=0)["text"]

    for seed in (1, 2, 3):
        assert client.generate(LLAMA, PROMPT, max_new_tokens=TOKENS, temperature=2.0, top_k=1,
                               seed=seed)["text"] == greedy
        streamed = "".join(client.stream_generate(LLAMA, PROMPT, max_new_tokens=TOKENS, temperature=2.0,
                                                  top_k=1, seed=seed))
        assert streamed == greedy


def test_repetition_penalty_gives_what_model_generate_gives(
        client: Client, loaded: None, tiny_models: TinyModels) -> None:
    plain = client.generate(LLAMA, PROMPT, max_new_tokens=TOKENS, temperature=0)["text"]

    penalised = client.generate(LLAMA, PROMPT, max_new_tokens=TOKENS, temperature=0, repetition_penalty=1.8)["text"]

    assert penalised == _hf_generate(tiny_models.text_llama, do_sample=False, repetition_penalty=1.8)
    assert penalised != plain
    # 1.0 is off
    assert client.generate(LLAMA, PROMPT, max_new_tokens=TOKENS, temperature=0, repetition_penalty=1.0)["text"] == plain


@pytest.mark.parametrize(("field", "value"), [
    ("top_k", -1), ("top_k", 2.5), ("top_k", "ten"), ("repetition_penalty", 0), ("repetition_penalty", -1.0),
    ("repetition_penalty", 10.5), ("repetition_penalty", "high"),
])
def test_a_bad_top_k_or_repetition_penalty_is_a_422_naming_it(
        server: ServerProcess, http: httpx.Client, loaded: None, field: str, value: Any) -> None:
    answer = http.post("/generate", json={"model": LLAMA, "prompt": PROMPT, "max_new_tokens": 2, field: value})

    assert answer.status_code == 422, answer.text
    assert field in answer.json()["error"] and "\n" not in answer.json()["error"]
    assert http.get("/health").json()["status"] == "ok"
    assert LLAMA in http.get("/health").json()["models"]


def test_null_sampling_fields_mean_the_models_own(http: httpx.Client, loaded: None) -> None:
    body = {"model": LLAMA, "prompt": PROMPT, "max_new_tokens": TOKENS}
    nulls = {"temperature": None, "top_p": None, "top_k": None, "repetition_penalty": None}

    answer = http.post("/generate", json={**body, **nulls})

    assert answer.status_code == 200, answer.text
    assert answer.json()["text"] == http.post("/generate", json=body).json()["text"]


# --- unknown fields are listed, not refused, on the original's endpoints ------------------------


def test_generate_lists_the_fields_it_ignored(http: httpx.Client, loaded: None) -> None:
    body = {"model": LLAMA, "prompt": PROMPT, "max_new_tokens": 3, "temperature": 0}

    answer = http.post("/generate", json={**body, "temprature": 0.5, "num_beams": 4})

    assert answer.status_code == 200, answer.text
    assert answer.json()["ignored"] == ["num_beams", "temprature"]
    assert "ignored" not in http.post("/generate", json=body).json()


def test_ws_generate_lists_the_fields_it_ignored_in_its_done_frame(server: ServerProcess, loaded: None) -> None:
    body = {"model": LLAMA, "prompt": PROMPT, "max_new_tokens": 3, "temperature": 0, "max_tokens": 9}

    with connect(f"ws://127.0.0.1:{server.port}/ws/generate", additional_headers=auth(server.token),
                 proxy=None) as ws:
        ws.send(json.dumps(body))
        frames = []
        while not frames or frames[-1]["type"] == "token":
            frames.append(json.loads(ws.recv()))

    assert frames[-1]["type"] == "done" and frames[-1]["ignored"] == ["max_tokens"]
    assert frames[-1]["tokens_generated"] == 3


def test_load_lists_the_fields_it_ignored(http: httpx.Client, loaded: None, tiny_models: TinyModels) -> None:
    answer = http.post("/models/load", json={"name": LLAMA, "path": str(tiny_models.text_llama), "kind": "text",
                                             "device_map": "auto"})

    assert answer.status_code == 200, answer.text
    assert answer.json()["ignored"] == ["device_map"] and answer.json()["already_loaded"]


# --- dtype spellings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("spelling", "dtype"), [("half", "float16"), ("fp16", "float16"), ("float", "float32"),
                                                 ("fp32", "float32"), ("bf16", "bfloat16")])
def test_load_takes_torch_dtype_spellings_and_answers_the_canonical_name(
        client: Client, tiny_models: TinyModels, spelling: str, dtype: str) -> None:
    name = f"settings-{spelling}"
    try:
        answer = client.load_model(name, "text", spelling, path=str(tiny_models.text_llama), progress=False)

        assert answer["dtype"] == dtype
        assert {m["name"]: m["dtype"] for m in client.models()}[name] == dtype
        assert client.generate(name, PROMPT, max_new_tokens=3, temperature=0)["tokens_generated"] >= 1
    finally:
        client.unload_model(name)


def test_an_unknown_dtype_spelling_is_a_422_listing_the_known_ones(
        http: httpx.Client, tiny_models: TinyModels) -> None:
    answer = http.post("/models/load", json={"name": "settings-bad", "path": str(tiny_models.text_llama),
                                             "dtype": "float64"})

    assert answer.status_code == 422
    assert "dtype" in answer.json()["error"] and "half" in answer.json()["error"]
    assert "settings-bad" not in http.get("/health").json()["models"]
