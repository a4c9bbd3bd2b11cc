"""The HTTP and WebSocket API (docs/HTTP_API.md), end to end: a real server, real sockets.

Everything here talks raw HTTP with ``httpx`` and raw WebSocket with ``websockets``, as any
client would, against the session's shared ``server``. The models this module needs are loaded
once, under names of its own (``api-...``), and unloaded when the module ends; tests that load
or unload more clean up after themselves, so the shared server is left as it was found.

Long generations use the tiny Llama with a greedy prompt that loops without ever producing the
end-of-sequence token, so a generation of ``LONG_TOKENS`` runs for many seconds unless it is
cancelled (each test cancels it within a second or two).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import threading
import time
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
from websockets.sync.client import connect

from kit import ServerProcess, TinyModels, auth
from mymps_magic import wire

GPT2 = "api-gpt2"
LLAMA = "api-llama"
DIFFUSION = "api-diffusion"
AUTO = "api-auto"
TORCHSCRIPT = "api-torchscript"
CHECKPOINT = "api-checkpoint"
CHECKPOINT_ST = "api-checkpoint-safetensors"

# Greedy decoding of this prompt on the tiny Llama falls into a loop without EOS, so it runs to
# max_new_tokens unless stopped (`long_generation` fails clearly if that ever changes).
LONG_PROMPT = "Machine learning"
LONG_TOKENS = 8192
# A prompt whose greedy continuation has no EOS within SHORT_TOKENS: used for exact comparisons.
SHORT_TOKENS = 24

STOP_REASONS = {"max_tokens", "eos", "stop", "cancelled"}
# SPEC 3 says "within milliseconds"; a loaded CI runner gets a generous margin.
METADATA_BUDGET_S = 0.5


def _load_specs(tiny: TinyModels) -> dict[str, dict[str, Any]]:
    return {
        GPT2: {"kind": "text", "path": str(tiny.text_gpt2)},
        LLAMA: {"kind": "text", "path": str(tiny.text_llama)},
        DIFFUSION: {"kind": "diffusion", "path": str(tiny.diffusion)},
        AUTO: {"kind": "auto", "path": str(tiny.auto)},
        TORCHSCRIPT: {"kind": "torchscript", "path": str(tiny.torchscript)},
        CHECKPOINT: {"kind": "checkpoint", "path": str(tiny.checkpoint), "model_class": tiny.checkpoint_class},
        CHECKPOINT_ST: {
            "kind": "checkpoint",
            "path": str(tiny.checkpoint_safetensors),
            "model_class": tiny.checkpoint_class,
        },
    }


@pytest.fixture(scope="module")
def loaded(http: httpx.Client, tiny_models: TinyModels) -> Iterator[dict[str, dict[str, Any]]]:
    """Load every kind once for the module; yields ``name -> the /models/load answer``."""
    specs = _load_specs(tiny_models)
    answers: dict[str, dict[str, Any]] = {}
    try:
        for name, spec in specs.items():
            answer = http.post("/models/load", json={"name": name, **spec})
            assert answer.status_code == 200, f"loading {name}: {answer.status_code} {answer.text}"
            answers[name] = answer.json()
        yield answers
    finally:
        for name in answers:
            http.delete(f"/models/{name}")


def jobs(http: httpx.Client) -> list[dict[str, Any]]:
    answer = http.get("/jobs")
    assert answer.status_code == 200, answer.text
    return answer.json()["jobs"]  # type: ignore[no-any-return]


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.01) -> Any:
    """Poll until ``predicate()`` is truthy; return its value, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(interval)


def wait_idle(http: httpx.Client, timeout: float = 10.0) -> None:
    wait_for(lambda: not jobs(http), timeout)


class Background:
    """An HTTP request running in a thread; ``result()`` waits for its answer."""

    def __init__(self, http: httpx.Client, method: str, path: str, **kwargs: Any) -> None:
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.response = http.request(method, path, **kwargs)
            except BaseException as exc:  # reported by result()
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self, timeout: float = 30.0) -> httpx.Response:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"no answer within {timeout} s"
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response


def running_job(http: httpx.Client, model: str, kind: str = "generate") -> dict[str, Any]:
    """Wait until a job of ``kind`` on ``model`` is running; return its /jobs entry."""

    def find() -> dict[str, Any] | None:
        for job in jobs(http):
            if job["model"] == model and job["kind"] == kind and job["state"] == "running":
                return job
        return None

    return wait_for(find)  # type: ignore[no-any-return]


@contextlib.contextmanager
def long_generation(http: httpx.Client) -> Iterator[tuple[dict[str, Any], Background]]:
    """A /generate of LONG_TOKENS running in a thread; cancelled on exit if still running."""
    body = {"model": LLAMA, "prompt": LONG_PROMPT, "max_new_tokens": LONG_TOKENS, "temperature": 0}
    request = Background(http, "POST", "/generate", json=body)

    def started() -> dict[str, Any] | None:
        if not request.thread.is_alive():
            answer = request.result()
            pytest.fail(f"the long generation ended before it was seen running: {answer.status_code} "
                        f"{answer.text[-300:]} (does greedy LONG_PROMPT still avoid EOS?)")
        return next((j for j in jobs(http) if j["model"] == LLAMA and j["state"] == "running"), None)

    job: dict[str, Any] = wait_for(started)
    try:
        yield job, request
    finally:
        if request.thread.is_alive():
            http.delete(f"/jobs/{job['id']}")
        request.thread.join(30)
        wait_idle(http)


def generate(http: httpx.Client, **body: Any) -> dict[str, Any]:
    answer = http.post("/generate", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


def ws_generate(server: ServerProcess, **body: Any) -> list[dict[str, Any]]:
    """Every frame of one /ws/generate exchange, until the server closes."""
    with connect(server.ws_url(), additional_headers=auth(server.token), proxy=None, open_timeout=10) as ws:
        ws.send(json.dumps(body))
        return [json.loads(message) for message in ws]


def ndjson_lines(answer: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in answer.text.splitlines() if line.strip()]


# --- /health, /stats, /models ---------------------------------------------------------------


def test_health_answers_without_a_token_and_never_shows_it(
    server: ServerProcess, loaded: dict[str, dict[str, Any]]
) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        answer = httpx.get(f"{server.url}/health", headers=headers, trust_env=False)

        assert answer.status_code == 200
        health = answer.json()
        assert health["status"] == "ok"
        assert health["protocol"] == wire.PROTOCOL_VERSION
        assert health["device"] == "cpu"
        for field in ("version", "python", "torch", "device_name"):
            assert isinstance(health[field], str) and health[field]
        assert set(loaded) <= set(health["models"])
        assert server.token not in answer.text


def test_stats_reports_memory_and_the_job_counts(http: httpx.Client) -> None:
    answer = http.get("/stats")

    assert answer.status_code == 200
    stats = answer.json()
    assert 0 <= stats["cpu_percent"] <= 100 * 1024
    assert 0 < stats["ram"]["used"] <= stats["ram"]["total"]
    assert stats["device"]["kind"] == "cpu" and stats["device"]["name"]
    for field in ("allocated", "driver", "total"):
        assert isinstance(stats["device"][field], int) and stats["device"][field] >= 0
    assert stats["jobs"] == {"running": 0, "queued": 0}


def test_models_lists_every_loaded_model_with_its_description(
    http: httpx.Client, loaded: dict[str, dict[str, Any]], tiny_models: TinyModels
) -> None:
    before = time.time()
    listed = {model["name"]: model for model in http.get("/models").json()}

    specs = _load_specs(tiny_models)
    for name in loaded:
        model = listed[name]
        assert model["kind"] == specs[name]["kind"]
        assert model["dtype"] == "float32"  # auto on cpu
        assert model["device"] == "cpu"
        assert model["parameters"] > 0
        assert model["bytes"] >= 4 * model["parameters"]  # float32: at least 4 bytes a parameter
        assert before - 600 < model["loaded_at"] <= model["last_used"] <= before + 1


# --- /models/load, DELETE /models/{name}, /models/{name}/info ----------------------------------


@pytest.mark.parametrize("name", [GPT2, LLAMA, DIFFUSION, AUTO, TORCHSCRIPT, CHECKPOINT, CHECKPOINT_ST])
def test_load_answers_with_the_model_it_loaded(
    loaded: dict[str, dict[str, Any]], tiny_models: TinyModels, name: str
) -> None:
    answer = loaded[name]

    assert answer["status"] == "ok"
    assert answer["name"] == name
    assert answer["kind"] == _load_specs(tiny_models)[name]["kind"]
    assert answer["device"] == "cpu"
    assert answer["dtype"] == "float32"
    assert answer["already_loaded"] is False
    assert answer["load_time_s"] >= 0


def test_loading_a_loaded_name_says_so_and_does_nothing(
    http: httpx.Client, loaded: dict[str, dict[str, Any]], tiny_models: TinyModels
) -> None:
    before = {m["name"]: m for m in http.get("/models").json()}[LLAMA]

    plain = http.post("/models/load", json={"name": LLAMA, "path": str(tiny_models.text_llama)})
    streamed = http.post(
        "/models/load",
        json={"name": LLAMA, "path": str(tiny_models.text_llama)},
        headers={"Accept": wire.NDJSON},
    )

    assert plain.status_code == 200
    assert plain.json()["already_loaded"] is True and plain.json()["status"] == "ok"
    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith(wire.NDJSON)
    final = ndjson_lines(streamed)[-1]
    assert final["already_loaded"] is True and final["name"] == LLAMA
    after = {m["name"]: m for m in http.get("/models").json()}[LLAMA]
    assert after["loaded_at"] == before["loaded_at"]  # not loaded a second time


def test_load_streams_ndjson_progress_then_the_final_object(
    http: httpx.Client, tiny_models: TinyModels
) -> None:
    name = "api-ndjson-llama"
    try:
        with http.stream(
            "POST",
            "/models/load",
            json={"name": name, "path": str(tiny_models.text_llama), "dtype": "float16"},
            headers={"Accept": wire.NDJSON},
        ) as answer:
            assert answer.status_code == 200
            assert answer.headers["content-type"].startswith(wire.NDJSON)
            lines = [json.loads(line) for line in answer.iter_lines() if line.strip()]

        *events, final = lines
        assert events, "no progress event before the final object"
        fractions = [event["progress"] for event in events]
        for event in events:
            assert event["event"] == "progress"
            assert isinstance(event["stage"], str) and isinstance(event["message"], str)
        assert all(0.0 <= f <= 1.0 for f in fractions) and fractions == sorted(fractions)
        # The weights report tensor by tensor (transformers' own loop), not only as one stage.
        tensors = [e["message"] for e in events if e["stage"] == "weights" and "tensors)" in e["message"]]
        assert len(tensors) >= 5, [e["message"] for e in events]
        done, total = tensors[-1].rsplit("(", 1)[1].split()[0].split("/")
        assert done == total
        assert final["status"] == "ok" and final["name"] == name
        assert final["already_loaded"] is False and final["dtype"] == "float16"
        assert name in http.get("/health").json()["models"]
    finally:
        http.delete(f"/models/{name}")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_load_with_a_dtype_shows_it_in_models(http: httpx.Client, tiny_models: TinyModels, dtype: str) -> None:
    name = f"api-llama-{dtype}"
    try:
        answer = http.post("/models/load", json={"name": name, "path": str(tiny_models.text_llama), "dtype": dtype})

        assert answer.status_code == 200, answer.text
        assert answer.json()["dtype"] == dtype
        listed = {m["name"]: m for m in http.get("/models").json()}
        assert listed[name]["dtype"] == dtype
        bytes_per_parameter = 4 if dtype == "float32" else 2
        assert listed[name]["bytes"] >= bytes_per_parameter * listed[name]["parameters"]
        assert listed[name]["bytes"] < (bytes_per_parameter + 1) * listed[name]["parameters"] + 1_000_000
    finally:
        http.delete(f"/models/{name}")


@pytest.mark.parametrize("name", ["api-unload", "api/nested/unload"])
def test_unload_forgets_the_model_and_frees_its_memory(
    http: httpx.Client, tiny_models: TinyModels, name: str
) -> None:
    loaded = http.post(
        "/models/load",
        json={"name": name, "kind": "checkpoint", "path": str(tiny_models.checkpoint),
              "model_class": tiny_models.checkpoint_class},
    )
    assert loaded.status_code == 200, loaded.text
    size = {m["name"]: m for m in http.get("/models").json()}[name]["bytes"]

    answer = http.delete(f"/models/{name}")

    assert answer.status_code == 200, answer.text
    assert answer.json() == {"status": "ok", "name": name, "freed_bytes": size}
    assert size > 0
    assert name not in [m["name"] for m in http.get("/models").json()]
    assert name not in http.get("/health").json()["models"]
    assert http.get(f"/models/{name}/info").status_code == 404
    assert http.delete(f"/models/{name}").status_code == 404


@pytest.mark.parametrize(("name", "model_type", "cls"), [(LLAMA, "llama", "LlamaForCausalLM"),
                                                         (GPT2, "gpt2", "GPT2LMHeadModel"),
                                                         (AUTO, "bert", "BertModel")])
def test_model_info_carries_the_config(
    http: httpx.Client, loaded: dict[str, dict[str, Any]], tiny_models: TinyModels,
    name: str, model_type: str, cls: str,
) -> None:
    answer = http.get(f"/models/{name}/info")

    assert answer.status_code == 200
    info = answer.json()
    assert info["name"] == name and info["kind"] in ("text", "auto")
    assert info["source"] == _load_specs(tiny_models)[name]["path"]
    assert info["class"] == cls
    assert info["config"]["model_type"] == model_type
    assert info["parameters"] > 0 and info["dtype"] == "float32" and info["device"] == "cpu"


def test_model_info_of_a_checkpoint_names_its_class(http: httpx.Client, loaded: dict[str, dict[str, Any]]) -> None:
    info = http.get(f"/models/{CHECKPOINT}/info").json()

    assert info["kind"] == "checkpoint" and info["class"] == "TinyNet"
    assert info["parameters"] == 4 * 2 + 2
    assert "config" in info


# --- /infer ----------------------------------------------------------------------------------


def infer(http: httpx.Client, model: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    answer = http.post(
        "/infer", content=wire.pack_tensors(tensors),
        headers={wire.HEADER_MODEL: model, "Content-Type": wire.MSGPACK},
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith(wire.MSGPACK)
    return wire.unpack_tensors(answer.content)


def test_infer_torchscript_matches_the_module_run_in_process(
    http: httpx.Client, loaded: dict[str, dict[str, Any]], tiny_models: TinyModels
) -> None:
    import torch

    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)

    outputs = infer(http, TORCHSCRIPT, {"x": x})

    expected = torch.jit.load(str(tiny_models.torchscript))(torch.from_numpy(x)).detach().numpy()
    assert list(outputs) == ["output"]
    assert outputs["output"].shape == (5, 3) and outputs["output"].dtype == np.float32
    np.testing.assert_allclose(outputs["output"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [CHECKPOINT, CHECKPOINT_ST])
def test_infer_checkpoint_matches_the_class_run_in_process(
    http: httpx.Client, loaded: dict[str, dict[str, Any]], tiny_models: TinyModels, name: str
) -> None:
    import torch
    from safetensors.torch import load_file

    from kitmodels import TinyNet

    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)

    outputs = infer(http, name, {"x": x})

    module = TinyNet()
    if name == CHECKPOINT:
        module.load_state_dict(torch.load(tiny_models.checkpoint, weights_only=True))
    else:
        module.load_state_dict(load_file(str(tiny_models.checkpoint_safetensors)))
    expected = module(torch.from_numpy(x)).detach().numpy()
    assert outputs["output"].shape == (3, 2)
    np.testing.assert_allclose(outputs["output"], expected, rtol=1e-5, atol=1e-6)


def test_infer_hf_text_model_with_input_ids_matches_in_process(
    http: httpx.Client, loaded: dict[str, dict[str, Any]], tiny_models: TinyModels
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models.text_gpt2)
    ids = tokenizer("The quick brown fox", return_tensors="np").input_ids.astype(np.int64)

    outputs = infer(http, GPT2, {"input_ids": ids})

    model = AutoModelForCausalLM.from_pretrained(tiny_models.text_gpt2).eval()
    with torch.inference_mode():
        expected = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert outputs["logits"].shape == (1, ids.shape[1], len(tokenizer))
    np.testing.assert_allclose(outputs["logits"], expected, rtol=1e-4, atol=1e-5)


def test_infer_auto_model_takes_and_returns_named_tensors(
    http: httpx.Client, loaded: dict[str, dict[str, Any]], tiny_models: TinyModels
) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models.auto)
    inputs = {k: v.astype(np.int64) for k, v in tokenizer(["hello world", "the mac gpu"], padding=True,
                                                            return_tensors="np").items()}

    outputs = infer(http, AUTO, inputs)

    model = AutoModel.from_pretrained(tiny_models.auto).eval()
    with torch.inference_mode():
        expected = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    assert {"last_hidden_state", "pooler_output"} <= set(outputs)
    assert outputs["last_hidden_state"].shape == (2, inputs["input_ids"].shape[1], 32)
    np.testing.assert_allclose(outputs["last_hidden_state"], expected.last_hidden_state.numpy(), atol=1e-5)
    np.testing.assert_allclose(outputs["pooler_output"], expected.pooler_output.numpy(), atol=1e-5)


# --- /generate -------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [GPT2, LLAMA])
def test_generate_answers_text_and_its_statistics(
    http: httpx.Client, loaded: dict[str, dict[str, Any]], model: str
) -> None:
    result = generate(http, model=model, prompt="The quick brown fox", max_new_tokens=20,
                      temperature=0.8, top_p=0.95, seed=3)

    assert set(result) >= {"text", "tokens_generated", "time_s", "tokens_per_s", "stop_reason"}
    assert isinstance(result["text"], str)
    assert 1 <= result["tokens_generated"] <= 20
    assert result["stop_reason"] in STOP_REASONS - {"cancelled", "stop"}
    if result["stop_reason"] == "max_tokens":
        assert result["tokens_generated"] == 20 and result["text"]
    assert result["time_s"] > 0
    assert result["tokens_per_s"] == pytest.approx(result["tokens_generated"] / result["time_s"], rel=0.05)


def test_generate_with_a_seed_is_reproducible(http: httpx.Client, loaded: dict[str, dict[str, Any]]) -> None:
    def sample(seed: int) -> str:
        return str(generate(http, model=LLAMA, prompt="Once upon a time", max_new_tokens=30,
                            temperature=1.5, top_p=1.0, seed=seed)["text"])

    first, again = sample(11), sample(11)
    others = {sample(seed) for seed in (12, 13, 14)}

    assert first == again
    assert len(others | {first}) > 1, "different seeds gave the same text every time: is the seed used?"


def test_generate_at_temperature_zero_is_greedy_and_matches_transformers(
    http: httpx.Client, loaded: dict[str, dict[str, Any]], tiny_models: TinyModels
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first = generate(http, model=LLAMA, prompt=LONG_PROMPT, max_new_tokens=SHORT_TOKENS, temperature=0)
    second = generate(http, model=LLAMA, prompt=LONG_PROMPT, max_new_tokens=SHORT_TOKENS, temperature=0, seed=99)

    tokenizer = AutoTokenizer.from_pretrained(tiny_models.text_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_models.text_llama).eval()
    inputs = tokenizer(LONG_PROMPT, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=SHORT_TOKENS, do_sample=False)
    expected = tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    assert first["text"] == second["text"] == expected
    assert first["tokens_generated"] == SHORT_TOKENS and first["stop_reason"] == "max_tokens"


def test_generate_stop_strings_cut_the_text(http: httpx.Client, loaded: dict[str, dict[str, Any]]) -> None:
    full = generate(http, model=LLAMA, prompt=LONG_PROMPT, max_new_tokens=SHORT_TOKENS, temperature=0)["text"]
    # A stop string that first occurs well inside the text, so the cut is visible.
    stop = next(full[i:i + 3] for i in range(len(full) // 2, len(full) - 3) if full.find(full[i:i + 3]) >= 3)
    cut_at = full.find(stop)

    result = generate(http, model=LLAMA, prompt=LONG_PROMPT, max_new_tokens=SHORT_TOKENS, temperature=0,
                      stop=["never in this text \u2603", stop])

    assert result["stop_reason"] == "stop"
    assert result["text"] == full[:cut_at]
    assert stop not in result["text"]
    assert result["tokens_generated"] < SHORT_TOKENS


# --- /image ----------------------------------------------------------------------------------


def test_image_answers_base64_pngs_and_the_seed(http: httpx.Client, loaded: dict[str, dict[str, Any]]) -> None:
    from PIL import Image

    body = {"model": DIFFUSION, "prompt": "", "steps": 2, "num_images": 2, "seed": 1234}
    answer = http.post("/image", json=body)
    again = http.post("/image", json=body)
    unseeded = http.post("/image", json={"model": DIFFUSION, "steps": 2})

    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["seed"] == 1234 and result["time_s"] > 0
    assert len(result["images"]) == 2
    for encoded in result["images"]:
        image = Image.open(io.BytesIO(base64.b64decode(encoded, validate=True)))
        assert image.format == "PNG" and image.size == (8, 8)
    assert again.json()["images"] == result["images"]  # same seed, same pictures
    assert unseeded.status_code == 200
    assert isinstance(unseeded.json()["seed"], int) and len(unseeded.json()["images"]) == 1


# --- /ws/generate ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 0},
        {"temperature": 1.2, "top_p": 0.9, "seed": 5},
        {"temperature": 0, "stop": ["wide"]},
    ],
    ids=["greedy", "seeded", "stop"],
)
def test_ws_generate_streams_the_same_text_as_generate(
    server: ServerProcess, http: httpx.Client, loaded: dict[str, dict[str, Any]], options: dict[str, Any]
) -> None:
    body = {"model": LLAMA, "prompt": LONG_PROMPT, "max_new_tokens": SHORT_TOKENS, **options}
    expected = generate(http, **body)

    frames = ws_generate(server, **body)

    *tokens, done = frames
    assert tokens and all(frame["type"] == "token" and isinstance(frame["text"], str) for frame in tokens)
    assert "".join(frame["text"] for frame in tokens) == expected["text"]
    assert done["type"] == "done"
    assert done["tokens_generated"] == expected["tokens_generated"]
    assert done["stop_reason"] == expected["stop_reason"]
    assert done["time_s"] > 0 and done["tokens_per_s"] > 0


def test_ws_generate_stops_when_its_client_disconnects(
    server: ServerProcess, http: httpx.Client, loaded: dict[str, dict[str, Any]]
) -> None:
    body = {"model": LLAMA, "prompt": LONG_PROMPT, "max_new_tokens": LONG_TOKENS, "temperature": 0}
    with connect(server.ws_url(), additional_headers=auth(server.token), proxy=None) as ws:
        ws.send(json.dumps(body))
        for _ in range(5):
            assert json.loads(ws.recv(timeout=10))["type"] == "token"
        job = running_job(http, LLAMA)
    disconnected = time.monotonic()

    # The generation had over 8000 tokens to go: it stops only because the client left. The last
    # progress seen before it vanished shows that it stopped early rather than finished.
    last_progress = [job["progress"] or 0.0]

    def gone() -> bool:
        current = [j for j in jobs(http) if j["id"] == job["id"]]
        if current:
            last_progress[0] = current[0]["progress"] or 0.0
        return not current

    wait_for(gone, timeout=5.0)
    assert time.monotonic() - disconnected < 2.0
    assert last_progress[0] < 0.5
    assert jobs(http) == []


# --- the job queue ---------------------------------------------------------------------------


def test_metadata_endpoints_answer_while_a_generation_runs(
    http: httpx.Client, loaded: dict[str, dict[str, Any]]
) -> None:
    with long_generation(http) as (job, request):
        for path in ("/health", "/stats", "/models", "/jobs"):
            started = time.perf_counter()
            answer = http.get(path)
            elapsed = time.perf_counter() - started
            assert answer.status_code == 200, f"{path}: {answer.status_code}"
            assert elapsed < METADATA_BUDGET_S, f"{path} took {elapsed:.3f} s while a job ran"
        assert http.get("/stats").json()["jobs"]["running"] == 1
        still = wait_for(lambda: [j for j in jobs(http) if j["id"] == job["id"] and j["progress"]], timeout=5)[0]
        assert still["state"] == "running" and still["kind"] == "generate" and still["model"] == LLAMA
        assert 0 < still["progress"] < 1
        assert still["started"] >= still["submitted"]
        assert request.thread.is_alive()


def test_cancelling_a_running_generation_stops_it_early(
    http: httpx.Client, loaded: dict[str, dict[str, Any]]
) -> None:
    with long_generation(http) as (job, request):
        answer = http.delete(f"/jobs/{job['id']}")

        assert answer.status_code == 200
        assert answer.json() == {"status": "ok", "id": job["id"], "cancelled": True}
        result = request.result(timeout=10)
    assert result.status_code == 200, result.text
    assert result.json()["stop_reason"] == "cancelled"
    assert 0 < result.json()["tokens_generated"] < LONG_TOKENS
    assert jobs(http) == []
    assert http.delete(f"/jobs/{job['id']}").status_code == 404  # it is gone


def test_cancelling_a_queued_job_means_it_never_runs(
    http: httpx.Client, loaded: dict[str, dict[str, Any]], tiny_models: TinyModels
) -> None:
    name = "api-queued-never-loaded"
    with long_generation(http) as (running, _):
        queued_load = Background(http, "POST", "/models/load", json={"name": name, "path": str(tiny_models.text_gpt2)})
        queued = wait_for(lambda: [j for j in jobs(http) if j["model"] == name])[0]
        assert queued["state"] == "queued" and queued["kind"] == "load"

        answer = http.delete(f"/jobs/{queued['id']}")

        assert answer.status_code == 200 and answer.json()["cancelled"] is True
        assert [j["id"] for j in jobs(http)] == [running["id"]]
        load_answer = queued_load.result(timeout=10)
    assert 400 <= load_answer.status_code < 500, f"{load_answer.status_code} {load_answer.text}"
    assert "cancel" in load_answer.json()["error"].lower()
    assert name not in http.get("/health").json()["models"]  # the queue ran dry without it


def test_a_failing_job_leaves_the_server_healthy_and_models_loaded(
    http: httpx.Client, loaded: dict[str, dict[str, Any]]
) -> None:
    # A prompt longer than GPT-2's 256 positions makes the forward pass itself fail.
    answer = http.post("/generate", json={"model": GPT2, "prompt": "the fox " * 300, "max_new_tokens": 4})

    assert answer.status_code >= 400
    assert answer.json()["error"]
    assert http.get("/health").json()["status"] == "ok"
    assert set(loaded) <= set(http.get("/health").json()["models"])
    wait_idle(http, timeout=2.0)  # nothing left behind (an immediate check is the next test's)
    after = generate(http, model=GPT2, prompt="The quick", max_new_tokens=5, temperature=0)
    assert after["tokens_generated"] == 5


def test_a_job_that_answered_is_no_longer_listed(http: httpx.Client, loaded: dict[str, dict[str, Any]]) -> None:
    """Once a request has its answer, its job is over: /jobs and /stats must not still show it.

    A failed job is the likelier case to linger (the server cleans up after a failure), so this
    sends many inputs the model rejects and looks at /jobs right after each answer.
    """
    wrong = wire.pack_tensors({"x": np.zeros((2, 5), np.float32)})
    lingering = []
    for _ in range(20):
        answer = http.post("/infer", content=wrong, headers={wire.HEADER_MODEL: TORCHSCRIPT})
        assert answer.status_code == 400
        listed = jobs(http)
        if listed:
            lingering.append(listed[0])

    assert lingering == [], f"{len(lingering)} of 20 answered jobs still listed, e.g. {lingering[0]}"
    assert http.get("/stats").json()["jobs"] == {"running": 0, "queued": 0}


# --- /openapi.json ---------------------------------------------------------------------------


def test_openapi_lists_every_http_path(http: httpx.Client) -> None:
    answer = http.get("/openapi.json")

    assert answer.status_code == 200
    # Parameter names are the server's own business: /jobs/{id} and /jobs/{job_id} are the same path.
    paths = {re.sub(r"\{[^}]*\}", "{}", path): item for path, item in answer.json()["paths"].items()}
    expected = {
        "/health": {"get"}, "/stats": {"get"}, "/models": {"get"}, "/models/load": {"post"},
        "/models/{}": {"delete"}, "/models/{}/info": {"get"}, "/jobs": {"get"},
        "/jobs/{}": {"delete"}, "/infer": {"post"}, "/generate": {"post"}, "/image": {"post"},
        "/session/{}/upload": {"put"},
    }
    for path, methods in expected.items():
        assert path in paths, f"{path} missing from /openapi.json"
        assert methods <= set(paths[path]), f"{path}: {set(paths[path])}"
