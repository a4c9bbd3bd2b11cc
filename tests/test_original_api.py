"""The original mymps's API, as its users reach it: its README's calls from a client written here
to that README (sync httpx, async websockets, msgpack; nothing of ours imported), the original
dashboard's expectations, and our `MympsClient` keeping the original's signatures and defaults.

The only change any of them makes is the bearer token, which the original did not have.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Any, Iterator
from urllib.parse import quote

import httpx
import msgpack
import numpy as np
import pytest

from kit import REPO_ROOT, ServerProcess, TinyModels, auth, never_ending_copy
from test_original_example import ORIGINAL_EXAMPLE

ORIGINAL_STOP_REASONS = {"eos", "max_tokens", "stop", "cancelled"}


class OriginalTokenStream:
    """``async with client.stream_generate(...) as s: async for token in s``; ``result`` at the end."""

    def __init__(self, url: str, headers: dict[str, str], request: dict[str, Any]) -> None:
        self.url, self.headers, self.request = url, headers, request
        self.result: dict[str, Any] | None = None
        self.text = ""

    async def __aenter__(self) -> OriginalTokenStream:
        from websockets.asyncio.client import connect

        self.ws = await connect(self.url, additional_headers=self.headers, proxy=None)
        await self.ws.send(json.dumps(self.request))
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.ws.close()

    def __aiter__(self) -> OriginalTokenStream:
        return self

    async def __anext__(self) -> str:
        if self.result is not None:
            raise StopAsyncIteration
        message = json.loads(await self.ws.recv())
        if message["type"] == "token":
            self.text += message["text"]
            return str(message["text"])
        assert message["type"] == "done", message
        self.result = {"text": self.text, **{k: v for k, v in message.items() if k != "type"}}
        raise StopAsyncIteration


class OriginalClient:
    """The original README's client interface, written from its API table (no code of ours)."""

    def __init__(self, host: str = "localhost", port: int = 5555, timeout: float = 60.0, *, token: str) -> None:
        self.headers = auth(token)
        self.ws_base = f"ws://{host}:{port}"
        self.http = httpx.Client(base_url=f"http://{host}:{port}", headers=self.headers, timeout=timeout,
                                 trust_env=False)

    def health(self) -> dict[str, Any]:
        return self._ok(self.http.get("/health"))  # type: ignore[no-any-return]

    def list_models(self) -> list[dict[str, Any]]:
        return self._ok(self.http.get("/models"))  # type: ignore[no-any-return]

    def load_model(self, name: str, dtype: str = "float16") -> dict[str, Any]:
        return self._ok(self.http.post("/models/load", json={"name": name, "dtype": dtype}))  # type: ignore[no-any-return]

    def unload_model(self, name: str) -> dict[str, Any]:
        return self._ok(self.http.delete(f"/models/{quote(name)}"))  # type: ignore[no-any-return]

    def infer(self, model: str, inputs: dict[str, np.ndarray], **headers: str) -> dict[str, np.ndarray]:
        body = msgpack.packb({name: {"shape": list(a.shape), "dtype": str(a.dtype), "data": a.tobytes()}
                              for name, a in inputs.items()})
        answer = self.http.post("/infer", content=body, headers={"x-model": model, **headers})
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "application/x-msgpack"
        return {name: np.frombuffer(t["data"], dtype=t["dtype"]).reshape(t["shape"])
                for name, t in msgpack.unpackb(answer.content).items()}

    def generate(self, model: str, prompt: str, max_new_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0) -> dict[str, Any]:
        body = {"model": model, "prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": temperature,
                "top_p": top_p}
        return self._ok(self.http.post("/generate", json=body))  # type: ignore[no-any-return]

    def stream_generate(self, model: str, prompt: str, max_new_tokens: int = 256, temperature: float = 1.0,
                        top_p: float = 1.0) -> OriginalTokenStream:
        body = {"model": model, "prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": temperature,
                "top_p": top_p}
        return OriginalTokenStream(f"{self.ws_base}/ws/generate", self.headers, body)

    def close(self) -> None:
        self.http.close()

    @staticmethod
    def _ok(answer: httpx.Response) -> Any:
        assert answer.status_code == 200, f"{answer.status_code} {answer.text}"
        return answer.json()


@pytest.fixture
def original(server: ServerProcess) -> Iterator[OriginalClient]:
    client = OriginalClient("127.0.0.1", server.port, token=server.token)
    yield client
    client.close()


@pytest.fixture(scope="module")
def endless(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Llama that never samples its EOS: a generation of N tokens gives N (by path, the
    name the original's users load it under)."""
    return str(never_ending_copy(tiny_models.text_llama, tmp_path_factory.mktemp("original") / "llama"))


def test_the_original_readme_calls_work_from_a_client_written_to_its_api(
        original: OriginalClient, endless: str) -> None:
    health = original.health()
    assert health["status"] == "ok"
    before = health["models_loaded"]

    loaded = original.load_model(endless)  # the original's default dtype: float16, on this CPU server too
    assert loaded["status"] == "ok" and loaded["name"] == endless and loaded["dtype"] == "float16"
    try:
        assert original.health()["models_loaded"] == before + 1
        result = original.generate(endless, "The meaning of life is", max_new_tokens=16)
        assert set(result) >= {"text", "tokens_generated", "time_s", "tokens_per_s", "stop_reason"}
        assert result["tokens_generated"] == 16 and result["stop_reason"] == "max_tokens" and result["text"]

        async def stream() -> OriginalTokenStream:
            async with original.stream_generate(endless, "Write a poem:\n", max_new_tokens=12) as s:
                async for token in s:
                    assert isinstance(token, str)
            return s

        streamed = asyncio.run(stream())
        assert streamed.result is not None and streamed.text
        assert streamed.result["tokens_generated"] == 12 and streamed.result["stop_reason"] == "max_tokens"
    finally:
        original.unload_model(endless)
    assert original.health()["models_loaded"] == before
    assert endless not in [m["name"] for m in original.list_models()]


def test_health_and_the_model_list_have_what_the_original_dashboard_shows(
        original: OriginalClient, endless: str) -> None:
    """Its status partial reads health's mps_available, mps_built, device, torch_version and
    models_loaded (a number), and lists /models as rows of name, device and loaded_at."""
    original.load_model(endless)
    try:
        health = original.health()
        assert isinstance(health["mps_available"], bool) and isinstance(health["mps_built"], bool)
        assert health["device"] in ("mps", "cuda", "cpu") and isinstance(health["torch_version"], str)
        assert health["torch_version"] == health["torch"]
        assert isinstance(health["models_loaded"], int) and health["models_loaded"] == len(health["models"]) >= 1

        listed = original.list_models()
        assert isinstance(listed, list)
        row = {m["name"]: m for m in listed}[endless]
        assert row["device"] == health["device"] and isinstance(row["loaded_at"], (int, float))
        assert row["dtype"] == "float16"  # and our own fields beside the original's
    finally:
        original.unload_model(endless)


def test_infer_answers_float32_msgpack_as_the_original_and_the_native_dtype_when_asked(
        server: ServerProcess, original: OriginalClient, endless: str) -> None:
    original.load_model(endless, dtype="half")
    ids = np.array([[1, 2, 3, 4]], dtype=np.int64)
    try:
        logits = original.infer(endless, {"input_ids": ids})["logits"]
        assert logits.dtype == np.float32 and logits.shape[:2] == (1, 4)

        native = original.infer(endless, {"input_ids": ids}, **{"x-dtype": "native"})["logits"]
        assert native.dtype == np.float16
        np.testing.assert_array_equal(native.astype(np.float32), logits)

        bad = original.http.post("/infer", content=msgpack.packb({}), headers={"x-model": endless, "x-dtype": "int8"})
        assert bad.status_code == 400 and "x-dtype" in bad.json()["error"]
        assert endless in original.health()["models"]
    finally:
        original.unload_model(endless)


def test_mympsclient_keeps_the_originals_signatures_and_defaults(server: ServerProcess, endless: str) -> None:
    from mymps_magic import MympsClient

    client = MympsClient("127.0.0.1", server.port, 120.0, token=server.token)  # host, port, timeout
    try:
        assert client.load_model(endless)["dtype"] == "float16"
        assert [m["name"] for m in client.list_models()] == [m["name"] for m in client.models()]
        result = client.generate(endless, "The meaning of life is")  # 256 tokens, sampled at 1.0 / 1.0
        assert result["tokens_generated"] == 256 and result["stop_reason"] == "max_tokens"

        async def stream() -> Any:
            async with client.stream_generate(endless, "Write a poem:\n", max_new_tokens=10) as s:
                async for _ in s:
                    pass
            return s

        s = asyncio.run(stream())
        assert s.result is not None and s.result["tokens_generated"] == 10
        assert s.result["stop_reason"] == "max_tokens" and s.result["text"]
        assert {k: v for k, v in s.result.items() if k != "text"} == s.stats
    finally:
        client.unload_model(endless)
        client.close()


def test_the_original_readme_example_runs_with_the_token_passed_to_mympsclient(
        tmp_path: Path, server: ServerProcess, endless: str) -> None:
    """The port comes from the environment (the test server's is not 5555); the token is the
    one change to the example's text."""
    example = ORIGINAL_EXAMPLE.format(model=endless).replace("MympsClient()", f"MympsClient(token={server.token!r})")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MYMPS_")}
    env.update({"MYMPS_SERVER_PORT": str(server.port), "PYTHONPATH": str(REPO_ROOT), "MYMPS_HOME": str(tmp_path)})

    done = subprocess.run([sys.executable, "-c", example], env=env, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "Traceback" not in done.stderr
    assert endless not in httpx.get(f"{server.url}/health", trust_env=False).json()["models"]
