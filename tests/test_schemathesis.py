"""Bad input at scale (issue 16, item 2): schemathesis against the live server's ``/openapi.json``.

Every operation the server describes is called with generated requests, valid ones and invalid
ones, with the token. Where a request names a model or a session, it is given a real one half of
the time, so that the generated bodies reach the deep paths (the generation, the pipeline, the
upload) instead of stopping at a 404 for a made-up name. Every answer must be a non-5xx whose
body matches the schema; afterwards the server is healthy and its models are loaded.

The examples are derandomized (the same requests on every run) and bounded per operation, so the
test takes about a minute on two cores.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from kit import ServerProcess, TinyModels, auth, never_ending_copy
from mymps_magic import Client, wire

TEXT, SCRIPT, PIPELINE = "fuzz-llama", "fuzz-torchscript", "fuzz-ddpm"
NAMES = (TEXT, SCRIPT, PIPELINE)
EXAMPLES_PER_OPERATION = 30
# Work a real model is asked for is cut to this, so a valid request that reaches the device ends
# in milliseconds: the test is about the answers, not about how long a 1000-step image takes.
MOST_TOKENS, MOST_STEPS, MOST_IMAGES, MOST_SIDE = 4, 3, 2, 16


@pytest.fixture(scope="module")
def models(server: ServerProcess, tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    llama = never_ending_copy(tiny_models.text_llama, tmp_path_factory.mktemp("fuzz") / "llama")
    with Client(port=server.port, token=server.token) as client:
        client.load_model(TEXT, kind="text", path=str(llama), progress=False)
        client.load_model(SCRIPT, kind="torchscript", path=str(tiny_models.torchscript), progress=False)
        client.load_model(PIPELINE, kind="diffusion", path=str(tiny_models.diffusion), progress=False)
        yield
        for name in NAMES:
            client.unload_model(name)


@pytest.fixture(scope="module")
def session_id(server: ServerProcess) -> Iterator[str]:
    """A live session's id, for the upload route."""
    with connect(server.ws_url("/ws/session"), additional_headers=auth(server.token), proxy=None) as ws:
        for message in wire.encode_frame(wire.hello(None, 0)):
            ws.send(bytes(message))
        welcome = wire.FrameDecoder().feed(ws.recv(timeout=30))
        assert welcome is not None and welcome.type == "welcome"
        yield str(welcome["session"])


def with_real_names(case: Any, use_real: bool, pick: int, session: str) -> Any:
    """Give ``case`` a real model name (in its path and body) and session id when ``use_real``,
    and bound the work it asks of a real model (a valid value over the bound is cut to it, a
    missing or null length set to it; invalid values stay as they are)."""
    if not use_real:
        return case
    path = case.operation.path
    name = PIPELINE if "image" in path else SCRIPT if "infer" in path else NAMES[pick % len(NAMES)]
    parameters = case.path_parameters or {}
    for key in parameters:
        parameters[key] = session if "session" in key else name
    if isinstance(case.body, dict):
        if pick == 0:  # every third: what the model takes, so the request gets as far as it can
            if "messages" in case.body:
                case.body["messages"] = [{"role": "user", "content": "hello"}]
            for key in ("width", "height", "guidance_scale"):  # options the tiny DDPM pipeline refuses
                case.body.pop(key, None)
        for key in ("model", "name"):
            if key in case.body:
                case.body[key] = name
        case.body.pop("keep_alive", None)  # a short one would unload the model the other operations use
        length = LENGTH_FIELDS.get(path)
        if length and not any(key in case.body for key in LENGTHS):
            case.body[length] = MOST_TOKENS  # a chat's default is the model's whole context
        for key, most in BOUNDS.items():
            value = case.body.get(key)
            if key in LENGTHS and key in case.body and value is None:
                case.body[key] = most
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and value > most:
                case.body[key] = type(value)(most)
    return case


LENGTHS = ("max_new_tokens", "max_tokens", "max_completion_tokens")
LENGTH_FIELDS = {"/generate": "max_new_tokens", "/chat": "max_new_tokens", "/v1/chat/completions": "max_tokens",
                 "/v1/completions": "max_tokens"}
BOUNDS = {**dict.fromkeys(LENGTHS, MOST_TOKENS), "steps": MOST_STEPS, "num_images": MOST_IMAGES,
          "width": MOST_SIDE, "height": MOST_SIDE}


def destroys_models(method: str, path: str) -> bool:
    """An unload: it keeps its made-up names, so the models stay for the other operations."""
    return method == "DELETE" and path.startswith("/models/")


@pytest.mark.slow
def test_generated_requests_to_every_operation_get_no_5xx_and_match_the_schema(
    server: ServerProcess, models: None, session_id: str
) -> None:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis.checks import not_a_server_error, response_schema_conformance
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=auth(server.token))
    failures: list[str] = []
    statuses: dict[str, set[int]] = {}
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        method, path = operation.method.upper(), operation.path
        positive = operation.as_strategy(GenerationMode.POSITIVE)
        made_up = st.builds(with_real_names, st.one_of(positive, operation.as_strategy(GenerationMode.NEGATIVE)),
                            st.just(False), st.just(0), st.just(session_id))
        # Real names go into valid requests: an invalid one is refused before any name is looked up.
        real = st.builds(with_real_names, positive, st.just(True), st.integers(0, len(NAMES) - 1), st.just(session_id))

        @given(case=made_up if destroys_models(method, path) else st.one_of(made_up, real))
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def call(case: Any) -> None:
            response = case.call_and_validate(headers=auth(server.token), timeout=60,
                                              checks=[not_a_server_error, response_schema_conformance])
            statuses.setdefault(f"{method} {path}", set()).add(response.status_code)

        try:
            call()
        except (Exception, BaseExceptionGroup) as exc:  # one operation's failure is reported with the others'
            failures.append(f"{method} {path}: {str(exc)[:3000]}")
    assert operations >= 10, f"only {operations} operations in /openapi.json"
    assert not failures, "\n\n".join(failures)
    deep = [f"POST {path}" for path in ("/generate", "/image", "/chat", "/v1/chat/completions", "/v1/completions")]
    for operation in deep + ["GET /models/{name}/info", "POST /models/load"]:
        assert any(200 <= status < 300 for status in statuses[operation]), f"{operation}: only {statuses[operation]}"

    health = httpx.get(f"{server.url}/health", trust_env=False, timeout=30)
    assert health.status_code == 200 and set(NAMES) <= set(health.json()["models"]), health.text
    with Client(port=server.port, token=server.token) as client:
        assert client.generate(TEXT, "hello", max_new_tokens=3, temperature=0)["tokens_generated"] == 3
        assert json.dumps(client.run(sum, [1, 2])) == "3"


@pytest.mark.parametrize("sampling", [{"temperature": 1e-300}, {"temperature": 1.0, "repetition_penalty": 1e-78}],
                         ids=["tiny-temperature", "tiny-repetition-penalty"])
@pytest.mark.parametrize("path", ["/generate", "/v1/chat/completions"])
def test_tiny_positive_sampling_parameters_are_answered_not_a_500(
    server: ServerProcess, models: None, path: str, sampling: dict[str, float]
) -> None:
    if path == "/generate":
        body: dict[str, Any] = {"prompt": "hello", "max_new_tokens": 2}
    else:
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
    answer = httpx.post(f"{server.url}{path}", json={"model": TEXT, **body, **sampling}, headers=auth(server.token),
                        trust_env=False, timeout=60)
    if "repetition_penalty" in sampling:  # refused in one line naming the field and its range
        assert answer.status_code == (422 if path == "/generate" else 400), answer.text  # 400: OpenAI's shape
        assert "repetition_penalty" in answer.text and "0.01" in answer.text, answer.text
    else:  # a temperature too cold to divide by decodes greedily
        assert answer.status_code == 200, answer.text
