"""`mymps token rotate` (issue 16, item 1): a new token, in force at once, the old one refused.

The real server and the real command, each a process of its own, sharing the server's home.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from kit import REPO_ROOT, MakeServer, ServerProcess, auth
from mymps_magic import Client
from sshd import SSHServer, sshd  # noqa: F401  (the fixture)


def rotate(home: Path, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """``mymps token rotate`` as the server's user runs it, on the server's machine."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MYMPS_")}
    env.update(MYMPS_HOME=str(home), MYMPS_SERVER_PORT=str(port))
    return subprocess.run([sys.executable, "-m", "mymps_magic.cli", "token", "rotate", *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO_ROOT, env=env)


def status_with(server: ServerProcess, token: str) -> int:
    return httpx.get(f"{server.url}/models", headers=auth(token), trust_env=False, timeout=30).status_code


def test_rotate_makes_the_running_server_refuse_the_old_token_and_take_the_new(make_server: MakeServer) -> None:
    server = make_server(token_file=True)
    old = server.token
    assert status_with(server, old) == 200

    done = rotate(server.home, server.port)

    assert done.returncode == 0, done.stdout + done.stderr
    new = (server.home / "token").read_text().strip()
    assert new != old and len(new) == 64
    assert stat.S_IMODE((server.home / "token").stat().st_mode) == 0o600
    assert "accepts the new token" in done.stdout
    assert new not in done.stdout + done.stderr and old not in done.stdout + done.stderr
    assert status_with(server, old) == 401
    assert status_with(server, new) == 200
    with pytest.raises(InvalidStatus):
        with connect(server.ws_url("/ws/session"), additional_headers=auth(old), proxy=None, open_timeout=30):
            pass
    with connect(server.ws_url("/ws/session"), additional_headers=auth(new), proxy=None, open_timeout=30):
        pass

    # A client on this machine finds the new token in the home, as it finds any token.
    probe = f"from mymps_magic import Client; print(len(Client(port={server.port}).models()))"
    env = {key: value for key, value in os.environ.items() if not key.startswith("MYMPS_")}
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
                           env={**env, "MYMPS_HOME": str(server.home)})
    assert found.returncode == 0 and found.stdout.strip() == "0", found.stderr

    # Rotating again works the same; the log says so and holds neither token, though both were
    # in paths it logged (a 404 for a model named like the token).
    for token in (old, new):
        assert httpx.get(f"{server.url}/models/{token}/info", headers=auth(new), trust_env=False).status_code == 404
    assert rotate(server.home, server.port).returncode == 0
    assert status_with(server, new) == 401
    server.stop()
    log = (server.home / "server.log").read_text()
    assert log.count("its new token is in use") == 2
    assert old not in log and new not in log
    assert log.count("GET /models/<token>/info -> 404") == 2


def test_rotate_with_no_server_running_writes_the_token_for_its_next_start(tmp_path: Path) -> None:
    from mymps_magic.cli.localserver import free_port

    done = rotate(tmp_path / "home", free_port())

    assert done.returncode == 0, done.stderr
    assert "no server answers" in done.stdout
    assert stat.S_IMODE((tmp_path / "home" / "token").stat().st_mode) == 0o600


def test_a_server_with_a_fixed_token_is_reported_and_keeps_it(make_server: MakeServer) -> None:
    server = make_server()  # MYMPS_TOKEN: the file in its home is not its token

    done = rotate(server.home, server.port)

    assert done.returncode == 1
    assert "refuses the new token" in done.stderr and "MYMPS_TOKEN" in done.stderr
    assert status_with(server, server.token) == 200


def test_a_token_file_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")

    done = rotate(tmp_path, 1, "--token-file", str(tmp_path / "a-file" / "token"))

    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "cannot write" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_the_tunnel_fetches_the_rotated_token_when_it_reconnects(
    sshd: SSHServer, make_server: MakeServer, tmp_path: Path  # noqa: F811
) -> None:
    from test_tunnel import TunnelProcess

    server = make_server(token_file=True)
    tunnel = TunnelProcess(sshd, server, tmp_path / "local-home")
    try:
        tunnel.wait_for(" up: ")
        assert tunnel.token_file.read_text().strip() == server.token
        assert rotate(server.home, server.port).returncode == 0
        new = (server.home / "token").read_text().strip()

        tunnel.ssh_child().kill()  # the connection drops, as a laptop's does
        tunnel.wait_for("reconnected in")

        assert tunnel.token_file.read_text().strip() == new
        with Client("127.0.0.1", tunnel.local_port, token_file=tunnel.token_file) as client:
            assert client.models() == []
    finally:
        tunnel.stop()


def test_a_bad_port_is_named_in_one_line(tmp_path: Path) -> None:
    done = rotate(tmp_path, 1, "--port", "not-a-port")

    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "not-a-port" in done.stderr and "Traceback" not in done.stderr


def test_a_token_file_emptied_or_removed_keeps_the_token_in_force(make_server: MakeServer) -> None:
    server = make_server(token_file=True)
    token_file = server.home / "token"

    token_file.write_text("\n")
    assert status_with(server, server.token) == 200
    token_file.unlink()
    assert status_with(server, server.token) == 200
    assert status_with(server, "wrong") == 401

    token_file.write_text("a-new-token-by-hand\n")  # any way of writing the file counts, not only the command
    assert status_with(server, "a-new-token-by-hand") == 200
    assert status_with(server, server.token) == 401
