"""server.log says what happened, one line each, never the token; the server's files are private."""

from __future__ import annotations

import stat
import threading
import time
from pathlib import Path

import httpx
import pytest

from kit import MakeServer, ServerProcess, TinyModels, auth
from mymps_magic import Client


def server_log(server: ServerProcess) -> str:
    return (server.home / "server.log").read_text(errors="replace")


def wait_for_line(server: ServerProcess, needle: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while needle not in server_log(server):
        assert time.monotonic() < deadline, f"{needle!r} not in server.log:\n{server_log(server)[-3000:]}"
        time.sleep(0.05)
    return next(line for line in server_log(server).splitlines() if needle in line)


@pytest.mark.slow
def test_the_log_records_start_errors_cancels_and_stop_and_never_the_token(
    make_server: MakeServer, tiny_models: TinyModels
) -> None:
    server = make_server(token_file=True)
    token = server.token
    start = wait_for_line(server, "mymps server")
    assert f"on http://127.0.0.1:{server.port}" in start and "device cpu" in start and f"token in {server.home}" in start

    with httpx.Client(base_url=server.url, trust_env=False, timeout=30) as http:
        # A token in a query string (a careless client) and a wrong one in the header: both 401s.
        assert http.get(f"/models?token={token}", headers=auth("wrong")).status_code == 401
        assert http.get("/models/nothing-here/info", headers=auth(token)).status_code == 404
        assert http.post("/models/load", headers=auth(token), json={"name": "x", "kind": "nonsense"}).status_code == 422
    assert "GET /models -> 401: missing or wrong token" in wait_for_line(server, "-> 401")
    assert "GET /models/nothing-here/info -> 404: " in wait_for_line(server, "-> 404")
    assert "POST /models/load -> 422: " in wait_for_line(server, "-> 422")

    with Client(port=server.port, token=token) as client:
        client.load_model("net", kind="torchscript", path=str(tiny_models.torchscript), progress=False)
        future = client.submit(time.sleep, 1000)
        deadline = time.monotonic() + 30
        while not client.jobs():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        job = client.jobs()[0]
        client.cancel(job["id"])
        line = wait_for_line(server, f"job {job['id']} (run, session ")
        assert "cancelled while running" in line
        threading.Thread(target=lambda: future.exception(30), daemon=True).start()

    assert server.process is not None
    server.stop()
    log = server_log(server)
    assert "shutting down (SIGTERM)" in log and "stopped (SIGTERM)" in log
    assert token not in log and token not in server.log_text()
    for name in ("server.log", "state.json"):
        assert stat.S_IMODE((server.home / name).stat().st_mode) == 0o600, name


def test_server_files_are_private_even_when_they_existed_wider(make_server: MakeServer, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "server.log").write_text("an old line\n")
    (home / "server.log").chmod(0o644)
    server = make_server(home=home)
    assert server.process is not None
    assert stat.S_IMODE((home / "server.log").stat().st_mode) == 0o600
    assert stat.S_IMODE((home / f"running-{server.process.pid}.json").stat().st_mode) == 0o600


@pytest.mark.parametrize("where", ["home", "token-file"])
def test_the_401_message_names_the_servers_real_token_file(make_server: MakeServer, tmp_path: Path, where: str) -> None:
    """Not ``~/.mymps/token`` when the server keeps its token elsewhere (the path is no secret)."""
    home = tmp_path / "elsewhere-home"
    if where == "home":
        expected = home / "token"
        server = make_server(home=home, token_file=True)
    else:  # an empty MYMPS_TOKEN is no token: the server uses (and creates) its token file
        expected = tmp_path / "keys" / "mymps.token"
        server = make_server(home=home, env={"MYMPS_TOKEN": "", "MYMPS_TOKEN_FILE": str(expected)})
    refused = httpx.get(f"{server.url}/models", trust_env=False)
    assert refused.status_code == 401
    message = refused.json()["error"]
    assert str(expected) in message and "~/.mymps" not in message


def test_the_log_holds_the_servers_lines_not_libraries_or_user_code(make_server: MakeServer) -> None:
    """Lines of other loggers (a library's, the user's own) are not the server's to record: they
    stay out of server.log (with no handler of their own, a user's warning reaches its cell)."""
    server = make_server()
    with Client(port=server.port, token=server.token) as client:
        client.run_cell("import logging\nlogging.getLogger('httpx').warning('a library line')\n"
                        "logging.getLogger().warning('a user line')")
        client.reset()  # a server line written after the cell's
    wait_for_line(server, "session")
    server.stop()
    log = server_log(server)
    assert "stopped (SIGTERM)" in log
    assert "a library line" not in log and "a user line" not in log, log[-2000:]
