"""Bad input of every kind (issue 3, item 7): a clear 4xx, and the server stays up with its models.

Every test ends by checking that ``/health`` still answers 200 and that the models this module
loaded are still loaded. Requests are raw: ``httpx`` for HTTP, plain sockets where the request
itself must be malformed or incomplete, ``websockets`` for WebSocket.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import msgpack
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from kit import ServerProcess, TinyModels, auth
from rawhttp import read_answer
from mymps_magic import wire
from mymps_magic.cli.localserver import free_port

LLAMA = "bad-llama"
TORCHSCRIPT = "bad-torchscript"
CHECKPOINT = "bad-checkpoint"
NAMES = (LLAMA, TORCHSCRIPT, CHECKPOINT)
UNKNOWN = "no-such-model"

# The process must refuse a non-loopback bind before it loads anything heavy.
REFUSE_BUDGET_S = 15.0


@pytest.fixture(scope="module")
def loaded(http: httpx.Client, tiny_models: TinyModels) -> Iterator[tuple[str, ...]]:
    """The module's models on the shared server: a text model, a TorchScript and a checkpoint."""
    specs = {
        LLAMA: {"kind": "text", "path": str(tiny_models.text_llama)},
        TORCHSCRIPT: {"kind": "torchscript", "path": str(tiny_models.torchscript)},
        CHECKPOINT: {"kind": "checkpoint", "path": str(tiny_models.checkpoint),
                     "model_class": tiny_models.checkpoint_class},
    }
    try:
        for name, spec in specs.items():
            answer = http.post("/models/load", json={"name": name, **spec})
            assert answer.status_code == 200, f"loading {name}: {answer.text}"
        yield NAMES
    finally:
        for name in specs:
            http.delete(f"/models/{name}")


def assert_healthy(server: ServerProcess, names: tuple[str, ...] = NAMES) -> None:
    """``/health`` answers 200 and every model in ``names`` is still loaded; no job is left over."""
    health = httpx.get(f"{server.url}/health", trust_env=False, timeout=10.0)
    assert health.status_code == 200, health.text
    assert set(names) <= set(health.json()["models"]), f"models lost: {health.json()['models']}"
    deadline = time.monotonic() + 2.0  # a job that just failed may take a moment to clean up
    while True:
        jobs = httpx.get(f"{server.url}/jobs", headers=auth(server.token), trust_env=False, timeout=10.0)
        assert jobs.status_code == 200, jobs.text
        if not jobs.json()["jobs"] or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert jobs.json()["jobs"] == [], "a job was left behind"


def error_of(answer: httpx.Response, status: int) -> str:
    """Assert the status and the contract's error body; return the one-line message."""
    assert answer.status_code == status, f"expected {status}, got {answer.status_code}: {answer.text[:500]}"
    body = answer.json()
    assert isinstance(body, dict) and "error" in body, body
    message = body["error"]
    assert isinstance(message, str) and message and "\n" not in message
    return message


def raw_exchange(server: ServerProcess, request: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    """Send raw bytes, read one HTTP answer; ``(status, body)``. The request may be incomplete."""
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        sock.sendall(request)
        head, body = read_answer(sock)
    return int(head.split(b" ", 2)[1]), body


def ws_frames(server: ServerProcess, first: str | bytes, token: str | None = None) -> list[dict[str, Any]]:
    """Send one frame to /ws/generate, return every frame until the server closes."""
    headers = auth(server.token if token is None else token)
    with connect(server.ws_url(), additional_headers=headers, proxy=None, open_timeout=10) as ws:
        ws.send(first)
        return [json.loads(message) for message in ws]


# --- the token ---------------------------------------------------------------------------------

PROTECTED = [
    ("GET", "/stats"), ("GET", "/models"), ("GET", "/jobs"), ("GET", "/openapi.json"),
    ("GET", f"/models/{LLAMA}/info"), ("POST", "/models/load"), ("DELETE", f"/models/{LLAMA}"),
    ("DELETE", "/jobs/abc123"), ("POST", "/infer"), ("POST", "/generate"), ("POST", "/image"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_every_endpoint_but_health_needs_the_token(
    server: ServerProcess, loaded: tuple[str, ...], method: str, path: str
) -> None:
    token = server.token
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": token},  # no scheme
        {"Authorization": f"Bearer {token}x"},
        {"Authorization": f"Bearer {token[:-1]}"},
        {"Authorization": f"Basic {token}"},
    ):
        answer = httpx.request(method, f"{server.url}{path}", headers=headers, trust_env=False,
                               json={"model": LLAMA, "prompt": "x", "name": LLAMA})

        assert "token" in error_of(answer, 401)
        assert token not in answer.text
    assert_healthy(server)  # the unauthenticated DELETE /models/bad-llama unloaded nothing


def test_an_unauthenticated_body_is_never_read(server: ServerProcess, loaded: tuple[str, ...]) -> None:
    # A huge announced body of which a few bytes of garbage arrive: a server that read the body
    # before the token would wait for the rest (and time out here) or answer 400.
    head = (f"POST /generate HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: application/json\r\n"
            "Authorization: Bearer wrong\r\nContent-Length: 1000000000000\r\n\r\n").encode()
    status, body = raw_exchange(server, head + b"{this is not json")
    assert status == 401 and b"token" in body

    # The same without Content-Length: a chunked body that never ends.
    head = (f"POST /infer HTTP/1.1\r\nHost: {server.host}\r\nx-model: {TORCHSCRIPT}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    status, body = raw_exchange(server, head + b"5\r\n\xc1\xc1\xc1\xc1\xc1\r\n")
    assert status == 401

    # Complete bodies that would be 400s (invalid JSON, invalid msgpack) are 401s without a token.
    answer = httpx.post(f"{server.url}/generate", content=b"{not json", trust_env=False,
                        headers={"Content-Type": "application/json"})
    assert error_of(answer, 401)
    answer = httpx.post(f"{server.url}/infer", content=b"\xc1", headers={wire.HEADER_MODEL: TORCHSCRIPT},
                        trust_env=False)
    assert error_of(answer, 401)
    assert_healthy(server)


def test_a_valid_unauthenticated_request_does_nothing(
    server: ServerProcess, loaded: tuple[str, ...], tiny_models: TinyModels
) -> None:
    name = "bad-never-loaded"
    answer = httpx.post(f"{server.url}/models/load", json={"name": name, "path": str(tiny_models.text_gpt2)},
                        headers={"Authorization": "Bearer wrong"}, trust_env=False)

    error_of(answer, 401)
    assert name not in httpx.get(f"{server.url}/health", trust_env=False).json()["models"]
    assert_healthy(server)


@pytest.mark.parametrize("token", [None, "wrong-token"], ids=["no-token", "wrong-token"])
def test_ws_without_the_token_is_refused_at_the_handshake(
    server: ServerProcess, loaded: tuple[str, ...], token: str | None
) -> None:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    frame = json.dumps({"model": LLAMA, "prompt": "x", "max_new_tokens": 5})

    with pytest.raises((InvalidStatus, ConnectionClosed)) as refused:
        with connect(server.ws_url(), additional_headers=headers, proxy=None, open_timeout=10) as ws:
            ws.send(frame)
            ws.recv(timeout=10)

    if isinstance(refused.value, InvalidStatus):
        assert refused.value.response.status_code in (401, 403)
        assert server.token.encode() not in refused.value.response.body
    else:
        assert refused.value.rcvd is not None and refused.value.rcvd.code == 1008
    assert_healthy(server)


# --- unknown things ----------------------------------------------------------------------------

UNKNOWN_MODEL_REQUESTS = {
    "generate": ("POST", "/generate", {"json": {"model": UNKNOWN, "prompt": "hello"}}),
    "image": ("POST", "/image", {"json": {"model": UNKNOWN, "prompt": "a cat", "steps": 2}}),
    "infer": ("POST", "/infer", {"content": wire.pack_tensors({"x": np.zeros((1, 4), np.float32)}),
                                 "headers": {wire.HEADER_MODEL: UNKNOWN}}),
    "info": ("GET", f"/models/{UNKNOWN}/info", {}),
    "unload": ("DELETE", f"/models/{UNKNOWN}", {}),
}


@pytest.mark.parametrize("case", list(UNKNOWN_MODEL_REQUESTS))
def test_an_unknown_model_is_a_404_that_lists_the_loaded_ones(
    server: ServerProcess, http: httpx.Client, loaded: tuple[str, ...], case: str
) -> None:
    method, path, kwargs = UNKNOWN_MODEL_REQUESTS[case]

    message = error_of(http.request(method, path, **kwargs), 404)

    assert UNKNOWN in message
    for name in loaded:
        assert name in message
    assert_healthy(server)


def test_an_unknown_model_on_ws_generate_is_an_error_frame(server: ServerProcess, loaded: tuple[str, ...]) -> None:
    frames = ws_frames(server, json.dumps({"model": UNKNOWN, "prompt": "hello", "max_new_tokens": 5}))

    assert len(frames) == 1 and frames[0]["type"] == "error"
    assert UNKNOWN in frames[0]["error"] and LLAMA in frames[0]["error"]
    assert_healthy(server)


@pytest.mark.parametrize("first", ["{not json", "[1, 2, 3]", ""], ids=["invalid-json", "array", "empty"])
def test_a_malformed_first_ws_frame_is_an_error_frame(
    server: ServerProcess, loaded: tuple[str, ...], first: str
) -> None:
    frames = ws_frames(server, first)

    assert len(frames) == 1 and frames[0]["type"] == "error" and frames[0]["error"]
    assert_healthy(server)


@pytest.mark.parametrize(("method", "path"), [("GET", "/no/such/path"), ("POST", "/generat"),
                                              ("GET", "/models/load/extra/x"), ("PUT", "/generate")])
def test_a_path_or_method_that_does_not_exist_is_a_json_error(
    server: ServerProcess, http: httpx.Client, loaded: tuple[str, ...], method: str, path: str
) -> None:
    answer = http.request(method, path)

    assert answer.status_code in (404, 405)
    assert error_of(answer, answer.status_code)
    assert_healthy(server)


def test_cancelling_an_unknown_job_is_a_404(server: ServerProcess, http: httpx.Client, loaded: tuple[str, ...]) -> None:
    message = error_of(http.delete("/jobs/0123456789ab"), 404)

    assert "0123456789ab" in message
    assert_healthy(server)


@pytest.mark.parametrize(
    ("endpoint", "body", "model"),
    [("/generate", {"prompt": "hello"}, TORCHSCRIPT), ("/image", {"prompt": "a cat", "steps": 2}, LLAMA)],
    ids=["generate-on-torchscript", "image-on-text"],
)
def test_a_model_of_the_wrong_kind_is_a_400_naming_the_kind(
    server: ServerProcess, http: httpx.Client, loaded: tuple[str, ...], endpoint: str, body: dict[str, Any],
    model: str,
) -> None:
    message = error_of(http.post(endpoint, json={"model": model, **body}), 400)

    assert model in message and ("torchscript" in message or "text" in message)
    assert_healthy(server)


# --- /models/load --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"kind": "onnx"}, "kind"),
        ({"dtype": "int8"}, "dtype"),
        ({"dtype": "float64"}, "dtype"),
        ({"name": ""}, "name"),
        ({"trust_remote_code": "maybe"}, "trust_remote_code"),
    ],
    ids=["kind", "dtype-int8", "dtype-float64", "empty-name", "bool-type"],
)
def test_load_with_an_unknown_kind_or_dtype_is_a_422_naming_the_field(
    server: ServerProcess, http: httpx.Client, loaded: tuple[str, ...], tiny_models: TinyModels,
    body: dict[str, Any], field: str,
) -> None:
    request = {"name": "bad-never-loaded", "path": str(tiny_models.text_llama), **body}

    message = error_of(http.post("/models/load", json=request), 422)

    assert field in message
    assert "bad-never-loaded" not in http.get("/health").json()["models"]
    assert_healthy(server)


def test_load_of_a_missing_path_is_a_404_also_as_ndjson(
    server: ServerProcess, http: httpx.Client, loaded: tuple[str, ...], tmp_path: Path
) -> None:
    missing = str(tmp_path / "nothing-here")
    request = {"name": "bad-missing", "kind": "torchscript", "path": missing}

    assert missing in error_of(http.post("/models/load", json=request), 404)
    streamed = http.post("/models/load", json=request, headers={"Accept": wire.NDJSON})
    lines = [json.loads(line) for line in streamed.text.splitlines() if line.strip()]
    assert "error" in lines[-1] and missing in lines[-1]["error"]
    assert lines[-1].get("status", 404) == 404  # a status, where given, is the plain request's
    assert all(line.get("event") == "progress" for line in lines[:-1])
    assert_healthy(server)


def test_load_of_a_broken_checkpoint_fails_cleanly(
    server: ServerProcess, http: httpx.Client, loaded: tuple[str, ...], tiny_models: TinyModels, tmp_path: Path
) -> None:
    import torch

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a state dict")
    misfit = tmp_path / "misfit.pt"
    torch.save({"linear.weight": torch.zeros(3, 3), "linear.bias": torch.zeros(3)}, misfit)
    base = {"kind": "checkpoint", "model_class": tiny_models.checkpoint_class}

    error_of(http.post("/models/load", json={"name": "bad-junk", "path": str(junk), **base}), 400)
    message = error_of(http.post("/models/load", json={"name": "bad-misfit", "path": str(misfit), **base}), 400)
    assert "size mismatch" in message or "TinyNet" in message
    no_class = http.post("/models/load", json={"name": "bad-noclass", "kind": "checkpoint",
                                                "path": str(tiny_models.checkpoint)})
    assert "model_class" in error_of(no_class, 422)
    missing_class = {"name": "bad-noclass", "path": str(tiny_models.checkpoint), "kind": "checkpoint",
                     "model_class": "kitmodels:NoSuchNet"}
    assert "NoSuchNet" in error_of(http.post("/models/load", json=missing_class), 404)

    models = http.get("/health").json()["models"]
    assert not {"bad-junk", "bad-misfit", "bad-noclass"} & set(models)
    assert_healthy(server)


# --- /infer ------------------------------------------------------------------------------------

MALFORMED_MSGPACK = {
    "not-msgpack": b"\xc1\xc1\xc1",
    "truncated": wire.pack_tensors({"x": np.zeros((2, 4), np.float32)})[:-7],
    "empty": b"",
    "a-list": msgpack.packb([1, 2, 3]),
    "missing-keys": msgpack.packb({"x": {"shape": [2, 4]}}),
    "short-data": msgpack.packb({"x": {"shape": [2, 4], "dtype": "float32", "data": b"\x00" * 12}}),
    "bad-dtype": msgpack.packb({"x": {"shape": [2], "dtype": "float99", "data": b"\x00" * 8}}),
}


@pytest.mark.parametrize("case", list(MALFORMED_MSGPACK))
def test_malformed_msgpack_to_infer_is_a_400(
    server: ServerProcess, http: httpx.Client, loaded: tuple[str, ...], case: str
) -> None:
    answer = http.post("/infer", content=MALFORMED_MSGPACK[case],
                       headers={wire.HEADER_MODEL: TORCHSCRIPT, "Content-Type": wire.MSGPACK})

    error_of(answer, 400)
    assert_healthy(server)


WRONG_TENSORS = {
    "shape": ({"x": np.zeros((2, 5), np.float32)}, "shapes cannot be multiplied"),
    "dtype": ({"x": np.zeros((2, 4), np.int64)}, "dtype"),
}


@pytest.mark.parametrize("model", [TORCHSCRIPT, CHECKPOINT])
@pytest.mark.parametrize("wrong", list(WRONG_TENSORS))
def test_tensors_the_model_rejects_are_a_400_carrying_its_own_message(
    server: ServerProcess, http: httpx.Client, loaded: tuple[str, ...], model: str, wrong: str
) -> None:
    tensors, model_says = WRONG_TENSORS[wrong]

    message = error_of(http.post("/infer", content=wire.pack_tensors(tensors),
                                 headers={wire.HEADER_MODEL: model}), 400)

    assert model_says in message, f"the model's own message is missing from {message!r}"
    assert_healthy(server)
    good = http.post("/infer", content=wire.pack_tensors({"x": np.ones((2, 4), np.float32)}),
                     headers={wire.HEADER_MODEL: model})
    assert good.status_code == 200  # the model still works


def test_inputs_a_text_model_rejects_are_a_400(server: ServerProcess, http: httpx.Client, loaded: tuple[str, ...]) -> None:
    out_of_vocabulary = wire.pack_tensors({"input_ids": np.array([[1, 2, 10**6]], np.int64)})
    wrong_name = wire.pack_tensors({"pixel_values": np.zeros((1, 3, 8, 8), np.float32)})

    assert "index" in error_of(http.post("/infer", content=out_of_vocabulary,
                                         headers={wire.HEADER_MODEL: LLAMA}), 400).lower()
    # The model's own complaint: it got no input_ids.
    assert "input_ids" in error_of(http.post("/infer", content=wrong_name, headers={wire.HEADER_MODEL: LLAMA}), 400)
    assert_healthy(server)


def test_infer_without_the_model_header_is_refused(server: ServerProcess, http: httpx.Client, loaded: tuple[str, ...]) -> None:
    answer = http.post("/infer", content=wire.pack_tensors({"x": np.zeros((1, 4), np.float32)}))

    assert 400 <= answer.status_code < 500
    assert wire.HEADER_MODEL in answer.json()["error"]
    assert_healthy(server)


# --- /generate, /image, /ws/generate fields ---------------------------------------------------------

MALFORMED_JSON = {"truncated": b'{"model": "bad-llama", "prompt": "x"', "not-json": b"hello there",
                  "empty": b"", "trailing-garbage": b'{"model": "bad-llama", "prompt": "x"} }'}


@pytest.mark.parametrize("endpoint", ["/generate", "/models/load", "/image"])
@pytest.mark.parametrize("case", list(MALFORMED_JSON))
def test_malformed_json_is_a_400(
    server: ServerProcess, http: httpx.Client, loaded: tuple[str, ...], endpoint: str, case: str
) -> None:
    answer = http.post(endpoint, content=MALFORMED_JSON[case], headers={"Content-Type": "application/json"})

    error_of(answer, 400)
    assert_healthy(server)


BAD_GENERATE_FIELDS = [
    ({"prompt": ""}, "prompt"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": -5}, "max_new_tokens"),
    ({"max_new_tokens": 10**9}, "max_new_tokens"),
    ({"max_new_tokens": 8193}, "max_new_tokens"),
    ({"max_new_tokens": "ten"}, "max_new_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 10.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": -0.2}, "top_p"),
    ({"seed": -1}, "seed"),
    ({"stop": "not-a-list"}, "stop"),
    ({"top_k": -1}, "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
]
BAD_GENERATE_IDS = ["empty-prompt", "zero-tokens", "negative-tokens", "absurd-tokens", "8193-tokens",
                    "tokens-type", "cold", "hot", "top_p-0", "top_p-1.5", "top_p-negative", "seed", "stop-type",
                    "top_k-negative", "no-repetition-penalty"]


@pytest.mark.parametrize(("field_values", "field"), BAD_GENERATE_FIELDS, ids=BAD_GENERATE_IDS)
def test_generate_fields_out_of_range_are_a_422_naming_the_field(
    server: ServerProcess, http: httpx.Client, loaded: tuple[str, ...], field_values: dict[str, Any], field: str
) -> None:
    body = {"model": LLAMA, "prompt": "hello", "max_new_tokens": 5, **field_values}

    message = error_of(http.post("/generate", json=body), 422)

    assert field in message
    assert_healthy(server)


@pytest.mark.parametrize(("field_values", "field"), BAD_GENERATE_FIELDS, ids=BAD_GENERATE_IDS)
def test_ws_generate_fields_out_of_range_are_an_error_frame(
    server: ServerProcess, loaded: tuple[str, ...], field_values: dict[str, Any], field: str
) -> None:
    body = {"model": LLAMA, "prompt": "hello", "max_new_tokens": 5, **field_values}

    frames = ws_frames(server, json.dumps(body))

    assert [frame["type"] for frame in frames] == ["error"]
    assert field in frames[0]["error"]
    assert_healthy(server)


@pytest.mark.parametrize(
    ("field_values", "field"),
    [({"steps": 0}, "steps"), ({"steps": 1001}, "steps"), ({"num_images": 0}, "num_images"),
     ({"width": 7}, "width"), ({"guidance_scale": -1}, "guidance_scale")],
    ids=["no-steps", "too-many-steps", "no-images", "width", "guidance"],
)
def test_image_fields_out_of_range_are_a_422(
    server: ServerProcess, http: httpx.Client, loaded: tuple[str, ...], field_values: dict[str, Any], field: str
) -> None:
    message = error_of(http.post("/image", json={"model": LLAMA, "prompt": "a cat", **field_values}), 422)

    assert field in message
    assert_healthy(server)


# --- --max-body ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModels) -> Iterator[ServerProcess]:
    """A server of its own with ``--max-body 1KiB`` and the checkpoint loaded as ``small``."""
    with ServerProcess(tmp_path_factory.mktemp("small-body-home"), options={"max_body": "1KiB"}) as process:
        answer = httpx.post(f"{process.url}/models/load", headers=auth(process.token), trust_env=False, timeout=60,
                            json={"name": "small", "kind": "checkpoint", "path": str(tiny_models.checkpoint),
                                  "model_class": tiny_models.checkpoint_class})
        assert answer.status_code == 200, answer.text
        yield process


def _big_json() -> bytes:
    return json.dumps({"model": "small", "prompt": "x" * 2048}).encode()


def _big_msgpack() -> bytes:
    return wire.pack_tensors({"x": np.zeros((128, 4), np.float32)})  # 2 KiB of data


def _chunks(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), 256):
        yield data[start:start + 256]


@pytest.mark.parametrize("endpoint", ["/generate", "/models/load", "/infer"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_over_max_body_is_a_413(small_server: ServerProcess, endpoint: str, framing: str) -> None:
    data = _big_msgpack() if endpoint == "/infer" else _big_json()
    assert len(data) > 1024
    headers = {**auth(small_server.token), wire.HEADER_MODEL: "small",
               "Content-Type": wire.MSGPACK if endpoint == "/infer" else "application/json"}
    content: bytes | Iterator[bytes] = data if framing == "content-length" else _chunks(data)

    answer = httpx.post(f"{small_server.url}{endpoint}", content=content, headers=headers, trust_env=False, timeout=30)

    if framing == "chunked":
        assert "content-length" not in {k.lower() for k in answer.request.headers}
    assert "max-body" in error_of(answer, 413)
    assert_healthy(small_server, ("small",))


def test_a_body_within_max_body_still_works(small_server: ServerProcess) -> None:
    x = np.ones((2, 4), np.float32)
    answer = httpx.post(f"{small_server.url}/infer", content=_chunks(wire.pack_tensors({"x": x})), trust_env=False,
                        headers={**auth(small_server.token), wire.HEADER_MODEL: "small"}, timeout=30)

    assert answer.status_code == 200, answer.text
    assert wire.unpack_tensors(answer.content)["output"].shape == (2, 2)


def test_a_ws_message_over_max_body_closes_the_connection(small_server: ServerProcess) -> None:
    frame = json.dumps({"model": "small", "prompt": "x" * 4096})

    with pytest.raises(ConnectionClosed) as closed:
        with connect(small_server.ws_url(), additional_headers=auth(small_server.token), proxy=None) as ws:
            ws.send(frame)
            ws.recv(timeout=10)

    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009  # message too big
    assert_healthy(small_server, ("small",))


# --- start-up ------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_non_loopback_host_without_allow_remote_is_refused(tmp_path: Path, how: str) -> None:
    port = free_port()
    env = ServerProcess(tmp_path).environment()
    command = [sys.executable, "-m", "kernel_server", "--port", str(port), "--home", str(tmp_path)]
    if how == "flag":
        command += ["--host", "0.0.0.0"]
    else:
        env["MYMPS_BIND"] = "0.0.0.0"

    started = time.monotonic()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=REFUSE_BUDGET_S,
                              cwd=Path(__file__).resolve().parent.parent)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not exit within {REFUSE_BUDGET_S} s: it may be listening on 0.0.0.0:{port}")

    assert time.monotonic() - started < REFUSE_BUDGET_S
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "--allow-remote" in lines[0] and "0.0.0.0" in lines[0]
    assert "Traceback" not in done.stderr
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # nothing listens there



@pytest.fixture(scope="module")
def gpt2(http: httpx.Client, tiny_models: TinyModels) -> Iterator[str]:
    """The tiny GPT-2: learned absolute positions, a 256-token context."""
    name = "bad-gpt2"
    assert http.post("/models/load", json={"name": name, "path": str(tiny_models.text_gpt2)}).status_code == 200
    yield name
    http.delete(f"/models/{name}")


def test_a_prompt_longer_than_the_models_context_is_a_400(server: ServerProcess, http: httpx.Client, gpt2: str) -> None:
    answer = http.post("/generate", json={"model": gpt2, "prompt": "word " * 400, "max_new_tokens": 5})

    assert "context holds 256" in error_of(answer, 400)
    assert_healthy(server, (gpt2,))


def test_a_generation_that_would_run_past_the_context_stops_there(server: ServerProcess, http: httpx.Client, gpt2: str) -> None:
    answer = http.post("/generate", json={"model": gpt2, "prompt": "Once upon a time", "max_new_tokens": 1000,
                                          "temperature": 1.0, "seed": 1})

    assert answer.status_code == 200, answer.text
    assert answer.json()["stop_reason"] in ("max_tokens", "eos")
    assert answer.json()["tokens_generated"] < 256
    assert_healthy(server, (gpt2,))
