"""Model lifetime (issue 14 item 4): ``keep_alive`` per load and per request, the server's
``--keep-alive``, and ``/models``' ``keep_alive`` and ``expires_at``.

Each test runs a server of its own (its models come and go). Waiting for an expiry is waiting for
an event (the model leaving ``/models``) with `kit.wait_for`, never a fixed sleep; a model that
must *not* expire is checked against one that did, loaded at the same time with a shorter
``keep_alive``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import websockets.sync.client

from kit import REPO_ROOT, MakeServer, ServerProcess, TinyModels, auth, never_ending_copy, wait_for
from mymps_magic import Client
from mymps_magic.wire.keepalive import parse_keep_alive


def rest(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers=auth(server.token), timeout=120.0, trust_env=False)


def load(http: httpx.Client, name: str, path: Path, **fields: Any) -> dict[str, Any]:
    answer = http.post("/models/load", json={"name": name, "path": str(path), "kind": "text", **fields})
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


def models(http: httpx.Client) -> dict[str, dict[str, Any]]:
    """``/models`` by name, whichever shape the list comes in."""
    answer = http.get("/models").json()
    listed = answer["models"] if isinstance(answer, dict) else answer
    return {model["name"]: model for model in listed}


def generate(http: httpx.Client, name: str, **fields: Any) -> dict[str, Any]:
    answer = http.post("/generate", json={"model": name, "prompt": "hello", "max_new_tokens": 2,
                                          "temperature": 0, **fields})
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


def gone(http: httpx.Client, name: str) -> bool:
    return name not in models(http)


def wait_for_file(path: str) -> str:
    """Remote: hold the device until ``path`` exists."""
    while not os.path.exists(path):
        time.sleep(0.01)
    return "released"


@contextlib.contextmanager
def device_held(server: ServerProcess, tmp_path: Path) -> Iterator[None]:
    """The device busy with a session's job until the block ends: jobs submitted meanwhile queue."""
    release = tmp_path / f"release-{time.monotonic_ns()}"
    with Client(host="127.0.0.1", port=server.port, token=server.token) as holder:
        held = holder.submit(wait_for_file, str(release))
        wait_for(held.running, "the holding job to run")
        try:
            yield
        finally:
            release.touch()
            assert held.result(timeout=60) == "released"


def queued(http: httpx.Client, kind: str, model: str) -> bool:
    return any(job["kind"] == kind and job["model"] == model for job in http.get("/jobs").json()["jobs"])


def in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(fn()))
    thread.start()
    return thread, results


# --- the server's default -------------------------------------------------------------------------


def test_models_are_kept_forever_by_default(make_server: MakeServer, tiny_models: TinyModels) -> None:
    server = make_server()
    with rest(server) as http:
        load(http, "kept", tiny_models.text_llama)
        listed = models(http)["kept"]
    assert listed["keep_alive"] == -1
    assert listed["expires_at"] is None


def test_the_servers_keep_alive_applies_to_loads_that_give_none(make_server: MakeServer,
                                                              tiny_models: TinyModels) -> None:
    server = make_server(keep_alive="1s")
    with rest(server) as http:
        before = time.time()
        load(http, "short", tiny_models.text_llama)
        listed = models(http)["short"]
        assert listed["keep_alive"] == 1
        expires = datetime.fromisoformat(listed["expires_at"]).timestamp()
        assert before + 1 <= expires <= time.time() + 1
        wait_for(lambda: gone(http, "short"), "the model to expire after its 1 s")
        assert http.get("/health").json()["status"] == "ok"
    assert "unloaded short" in server.log_text() and "idle for 1s" in server.log_text()


def test_the_keep_alive_option_and_variable_take_durations(tmp_path: Path) -> None:
    for args, env in (([], {"MYMPS_KEEP_ALIVE": "5 minutes"}), (["--keep-alive", "5x"], {})):
        done = subprocess.run([sys.executable, "-m", "kernel_server", "--port", "0", "--home", str(tmp_path), *args],
                              capture_output=True, text=True, cwd=REPO_ROOT, env={**os.environ, **env}, timeout=120)
        assert done.returncode == 2
        line = done.stderr.strip()
        assert "\n" not in line and "keep_alive must be seconds" in line and "5m" in line
        assert ("MYMPS_KEEP_ALIVE" if env else "--keep-alive") in line


# --- per load -------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_alive", [0, "0s"])
def test_a_load_with_keep_alive_0_unloads_when_it_ends(make_server: MakeServer, tiny_models: TinyModels,
                                                       keep_alive: object) -> None:
    server = make_server()
    with rest(server) as http:
        answer = load(http, "once", tiny_models.text_llama, keep_alive=keep_alive)
        assert answer["status"] == "ok"
        wait_for(lambda: gone(http, "once"), "the model to be unloaded once its load ended")


def test_a_short_keep_alive_expires_and_minus_1_never_does(make_server: MakeServer, tiny_models: TinyModels) -> None:
    server = make_server(keep_alive="1s")
    with rest(server) as http:
        load(http, "forever", tiny_models.text_llama, keep_alive=-1)
        load(http, "brief", tiny_models.text_llama, keep_alive="1s")
        wait_for(lambda: gone(http, "brief"), "the 1 s model to expire")
        assert models(http)["forever"]["expires_at"] is None


def test_loading_a_loaded_model_sets_its_keep_alive(make_server: MakeServer, tiny_models: TinyModels) -> None:
    server = make_server()
    with rest(server) as http:
        load(http, "again", tiny_models.text_llama)
        answer = load(http, "again", tiny_models.text_llama, keep_alive="5m")
        assert answer["already_loaded"]
        assert models(http)["again"]["keep_alive"] == 300
        load(http, "again", tiny_models.text_llama, keep_alive=0)
        wait_for(lambda: gone(http, "again"), "the model to be unloaded by its new keep_alive")


# --- per request ----------------------------------------------------------------------------------


def test_a_requests_keep_alive_changes_the_models(make_server: MakeServer, tiny_models: TinyModels) -> None:
    server = make_server(keep_alive="1h")
    with rest(server) as http:
        load(http, "changed", tiny_models.text_llama)
        generate(http, "changed", keep_alive=-1)
        assert models(http)["changed"]["expires_at"] is None
        before = time.time()
        generate(http, "changed", keep_alive="5m")
        listed = models(http)["changed"]
        assert listed["keep_alive"] == 300
        assert before + 300 <= datetime.fromisoformat(listed["expires_at"]).timestamp() <= time.time() + 300
        generate(http, "changed", keep_alive=0)
        wait_for(lambda: gone(http, "changed"), "the model to be unloaded after the keep_alive 0 request")


def test_a_request_without_keep_alive_restarts_the_timer(make_server: MakeServer, tiny_models: TinyModels) -> None:
    server = make_server()
    with rest(server) as http:
        load(http, "timer", tiny_models.text_llama, keep_alive="1h")
        first = models(http)["timer"]["expires_at"]
        generate(http, "timer")
        listed = models(http)["timer"]
        assert listed["keep_alive"] == 3600
        assert listed["expires_at"] > first


def test_ws_generate_takes_keep_alive_and_the_running_stream_keeps_the_model(
        make_server: MakeServer, tiny_models: TinyModels, tmp_path: Path) -> None:
    server = make_server()
    copy = never_ending_copy(tiny_models.text_llama, tmp_path / "llama")
    with rest(server) as http:
        load(http, "streamed", copy)
        with websockets.sync.client.connect(server.ws_url(), additional_headers=auth(server.token)) as ws:
            ws.send(json.dumps({"model": "streamed", "prompt": "hi", "max_new_tokens": 40, "keep_alive": 0}))
            tokens = 0
            while (message := json.loads(ws.recv()))["type"] == "token":
                tokens += 1
                if tokens == 20:  # halfway: keep_alive 0 applies only once the stream ends
                    assert "streamed" in models(http)
                    assert not queued(http, "unload", "streamed")
            assert message["type"] == "done" and message["tokens_generated"] == 40
        wait_for(lambda: gone(http, "streamed"), "the model to be unloaded after the keep_alive 0 stream")


def test_chat_and_the_openai_endpoints_take_keep_alive(make_server: MakeServer, tiny_models: TinyModels) -> None:
    server = make_server()
    messages = [{"role": "user", "content": "hi"}]
    with rest(server) as http:
        for name, path, body in (
                ("chatted", "/chat", {"messages": messages, "max_new_tokens": 2}),
                ("completed", "/v1/chat/completions", {"messages": messages, "max_tokens": 2})):
            load(http, name, tiny_models.text_llama)
            answer = http.post(path, json={"model": name, "keep_alive": 0, **body})
            assert answer.status_code == 200, answer.text
            wait_for(lambda name=name: gone(http, name), f"{name} to be unloaded after its keep_alive 0 {path}")


def test_a_model_in_use_does_not_expire_until_its_jobs_end(make_server: MakeServer, tiny_models: TinyModels,
                                                          tmp_path: Path) -> None:
    """keep_alive 0 for a generation queued behind another job: the model stays for it."""
    server = make_server()
    with rest(server) as http:
        load(http, "busy", tiny_models.text_llama)
        with device_held(server, tmp_path):
            thread, results = in_thread(lambda: generate(http, "busy", keep_alive=0))
            wait_for(lambda: queued(http, "generate", "busy"), "the generation to queue")
            assert "busy" in models(http)
        thread.join()
        assert results and results[0]["tokens_generated"] == 2
        wait_for(lambda: gone(http, "busy"), "the model to be unloaded once its generation ended")


def test_an_expiry_that_a_queued_request_overtakes_keeps_the_model(make_server: MakeServer, tiny_models: TinyModels,
                                                                   tmp_path: Path) -> None:
    """The model expires while the device is busy, so its unload queues; a request queued after
    that unload still finds the model: the unload checks again when it runs."""
    server = make_server()
    copy = never_ending_copy(tiny_models.text_llama, tmp_path / "llama")
    with rest(server) as http:
        load(http, "late", copy, keep_alive="1s")
        with device_held(server, tmp_path):
            wait_for(lambda: queued(http, "unload", "late"), "the expired model's unload to queue")
            thread, results = in_thread(lambda: generate(http, "late"))
            wait_for(lambda: queued(http, "generate", "late"), "the generation to queue")
        thread.join()
        assert results and results[0]["tokens_generated"] == 2
        wait_for(lambda: gone(http, "late"), "the model to expire 1 s after the generation")


# --- bad values -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("spelled", "seconds"), [
    (300, 300), (2.5, 2.5), ("300", 300), ("5m", 300), ("1h30m", 5400), ("30s", 30), ("500ms", 0.5),
    (0, 0), ("0s", 0), (-1, -1), ("-1", -1), ("-5m", -1), (-0.5, -1), (" 1H ", 3600)])
def test_keep_alive_takes_seconds_and_ollamas_durations(spelled: object, seconds: float) -> None:
    assert parse_keep_alive(spelled) == seconds


@pytest.fixture(scope="module")
def kept(server: ServerProcess, tiny_models: TinyModels) -> Iterator[str]:
    """A model loaded on the shared server for this module, unloaded after it."""
    with rest(server) as http:
        load(http, "keep-alive-kept", tiny_models.text_llama)
        yield "keep-alive-kept"
        http.delete("/models/keep-alive-kept")


@pytest.mark.parametrize("bad", ["5 parsecs", "m5", "", True, [1], {"s": 1}, "1e999"])
def test_a_bad_keep_alive_is_a_422_naming_the_spellings(server: ServerProcess, tiny_models: TinyModels, kept: str,
                                                         bad: object) -> None:
    with rest(server) as http:
        for path, body in (("/models/load", {"name": "keep-alive-other", "path": str(tiny_models.text_llama),
                                             "keep_alive": bad}),
                           ("/generate", {"model": kept, "prompt": "hi", "keep_alive": bad})):
            answer = http.post(path, json=body)
            assert answer.status_code == 422, (path, answer.text)
            message = answer.json()["error"]
            assert "\n" not in message and "keep_alive" in message and "5m" in message
        listed = models(http)
        assert kept in listed and "keep-alive-other" not in listed
        assert listed[kept]["expires_at"] is None
        assert http.get("/health").json()["status"] == "ok"


def test_the_client_passes_keep_alive_on_load_generate_stream_and_chat(make_server: MakeServer,
                                                                       tiny_models: TinyModels) -> None:
    server = make_server()
    with Client(port=server.port, token=server.token) as client, rest(server) as http:
        client.load_model("kept", path=str(tiny_models.text_llama), dtype="float32", progress=False, keep_alive="5m")
        assert models(http)["kept"]["keep_alive"] == 300
        client.generate("kept", "Once", max_new_tokens=2, keep_alive=-1)
        assert models(http)["kept"]["expires_at"] is None
        with client.stream_generate("kept", "Once", max_new_tokens=2, keep_alive="1h") as stream:
            "".join(stream)
        assert models(http)["kept"]["keep_alive"] == 3600
        client.chat("kept", [{"role": "user", "content": "hi"}], max_new_tokens=2, keep_alive=0)
        wait_for(lambda: gone(http, "kept"), "the model unloaded after the chat that asked keep_alive 0")
