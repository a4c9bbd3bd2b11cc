"""Start-up loads (--preload, --restore) and a graceful stop (SIGTERM/SIGINT)."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import pytest

from kit import MakeServer, TinyModels
from kernel_server.settings import Settings, SettingsError, parse_preload
from mymps_magic import CancelledError, Client


def wait_for_models(client: Client, count: int, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        names = [m["name"] for m in client.models()]
        if len(names) >= count or time.monotonic() > deadline:
            return names
        time.sleep(0.1)


@pytest.mark.parametrize(("spec", "parsed"), [
    ("gpt2", ("gpt2", "detect", "auto")),
    ("org/model:diffusion", ("org/model", "diffusion", "auto")),
    ("/models/net.pt:torchscript:float16", ("/models/net.pt", "torchscript", "float16")),
])
def test_preload_specs(spec: str, parsed: tuple[str, str, str]) -> None:
    assert parse_preload(spec, "--preload") == parsed


@pytest.mark.parametrize(("env", "message"), [
    ({"MYMPS_PRELOAD": "gpt2:nonsense"}, "MYMPS_PRELOAD: 'gpt2:nonsense' has kind 'nonsense'"),
    ({"MYMPS_PRELOAD": "gpt2:text:float8"}, "has dtype 'float8'"),
    ({"MYMPS_RESTORE": "perhaps"}, "MYMPS_RESTORE='perhaps': use 1 or 0"),
])
def test_bad_start_up_loads_are_refused_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def test_preload_loads_at_start_and_bad_ones_only_warn(make_server: MakeServer, tiny_models: TinyModels) -> None:
    server = make_server(
        preload=[f"{tiny_models.text_gpt2}", f"{tiny_models.torchscript}:torchscript:float32", "/no/such/model",
                 f"{tiny_models.diffusion}"],
    )
    with Client(port=server.port, token=server.token) as client:
        names = wait_for_models(client, 3)
        assert names == [str(tiny_models.text_gpt2), str(tiny_models.torchscript), str(tiny_models.diffusion)]
        assert {m["name"]: m["kind"] for m in client.models()}[str(tiny_models.diffusion)] == "diffusion"
        assert client.generate(str(tiny_models.text_gpt2), "Once", max_new_tokens=3)["tokens_generated"] == 3
        deadline = time.monotonic() + 10
        while "could not load /no/such/model at start" not in server.log_text():
            assert time.monotonic() < deadline, server.log_text()
            time.sleep(0.1)
        assert client.health()["status"] == "ok"


@pytest.mark.slow
def test_sigterm_during_a_generation_tells_the_client_and_restore_brings_the_models_back(
    make_server: MakeServer, tiny_models: TinyModels
) -> None:
    server = make_server()
    client = Client(port=server.port, token=server.token)
    client.load_model("llama", path=str(tiny_models.text_llama), progress=False)
    client.load_model("net", kind="torchscript", path=str(tiny_models.torchscript), progress=False)
    client.load_model("gone", path=str(tiny_models.text_gpt2), progress=False)
    client.unload_model("gone")
    state = json.loads((server.home / "state.json").read_text())
    assert [m["name"] for m in state["models"]] == ["llama", "net"]

    failures: list[BaseException] = []

    def generate() -> None:
        try:
            client.generate("llama", "Machine learning", max_new_tokens=8000, temperature=0)
        except BaseException as exc:
            failures.append(exc)

    worker = threading.Thread(target=generate)
    worker.start()
    while not client.jobs():
        time.sleep(0.02)
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    worker.join(20)
    assert server.process.wait(20) == 0
    assert len(failures) == 1 and isinstance(failures[0], CancelledError)
    message = str(failures[0])
    assert "\n" not in message and "server is shutting down" in message
    with socket.socket() as sock:  # nothing listens on the port any more (as a new server binds it)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", server.port))
        sock.listen()
    client.close()

    server.process = None
    server.options["restore"] = True
    server.start()
    with Client(port=server.port, token=server.token) as again:
        assert wait_for_models(again, 2) == ["llama", "net"]
        assert again.generate("llama", "Once", max_new_tokens=2)["tokens_generated"] == 2


def test_sigint_stops_the_server_too(make_server: MakeServer) -> None:
    server = make_server()
    assert server.process is not None
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(20) == 0
    assert "shutting down (SIGINT)" in server.log_text()
