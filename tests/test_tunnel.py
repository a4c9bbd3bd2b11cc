"""`mymps tunnel` through a real sshd to a real server: the token, the forward, reconnection, stop.

The two ends have different ``MYMPS_HOME`` folders, as two machines would: the server's is its
``--home`` (given to the tunnel as ``--remote-home``), the client's is the test's own.
"""

from __future__ import annotations

import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from kit import REPO_ROOT, ServerProcess
from mymps_magic import Client
from mymps_magic.cli.localserver import free_port
from sshd import SSHServer, sshd  # noqa: F401  (the fixture)

LINE_TIMEOUT_S = 30.0


def _environment(local_home: Path) -> dict[str, str]:
    """The tunnel's environment: none of the developer's MYMPS_* settings, a home of its own."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MYMPS_")}
    env["MYMPS_HOME"] = str(local_home)
    return env


def mymps(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the `mymps` command as a user would, to the end."""
    return subprocess.run([sys.executable, "-m", "mymps_magic.cli", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


class TunnelProcess:
    """``mymps tunnel`` running as a subprocess, its stdout lines collected as they come."""

    def __init__(self, sshd: SSHServer, server: ServerProcess, local_home: Path, *,
                 remote_home: Path | None = None) -> None:
        self.local_port = free_port()
        self.env = _environment(local_home)
        self.token_file = local_home / "token"
        command = [sys.executable, "-m", "mymps_magic.cli", "tunnel", sshd.destination, *sshd.mymps_options,
                   "--local-port", str(self.local_port), "--remote-port", str(server.port),
                   "--remote-home", str(remote_home or server.home)]
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=self.env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = LINE_TIMEOUT_S) -> str:
        """The next line that contains ``text``; fails with everything printed so far."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no line with {text!r} in {timeout:g} s; the tunnel printed:\n{''.join(self.output)}")
            if text in line:
                return line

    def ssh_child(self) -> psutil.Process:
        """The tunnel's ssh process (its one child)."""
        children = psutil.Process(self.process.pid).children()
        assert len(children) == 1 and children[0].name() == "ssh", children
        return children[0]

    def client(self) -> Client:
        """A `Client` as a notebook here makes it: this port, the token from the local token file."""
        return Client("127.0.0.1", self.local_port)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(15)


@pytest.fixture(scope="module")
def remote_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The server on the "remote" machine, with its token in its own home (not in the env)."""
    with ServerProcess(tmp_path_factory.mktemp("remote-home"), token_file=True) as process:
        yield process


@pytest.fixture
def tunnel(sshd: SSHServer, remote_server: ServerProcess, tmp_path: Path,  # noqa: F811
           monkeypatch: pytest.MonkeyPatch) -> Iterator[TunnelProcess]:
    """A started tunnel, up; the test process's Client settings point at its local end."""
    for name in [key for key in os.environ if key.startswith("MYMPS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MYMPS_HOME", str(tmp_path / "local-home"))
    started = TunnelProcess(sshd, remote_server, tmp_path / "local-home")
    started.wait_for(" up: ")
    yield started
    started.stop()


@pytest.mark.slow
def test_the_tunnel_copies_the_token_and_forwards_the_server(
        tunnel: TunnelProcess, remote_server: ServerProcess) -> None:
    line = tunnel.output[-1]
    assert f"127.0.0.1:{tunnel.local_port} -> " in line and "on cpu" in line and "torch" in line
    assert tunnel.token_file.read_text().strip() == remote_server.token
    assert stat.S_IMODE(tunnel.token_file.stat().st_mode) == 0o600
    with tunnel.client() as client:
        assert client.settings.token_source == str(tunnel.token_file)
        assert client.health()["status"] == "ok"
        assert client.models() == []
        assert client.run(lambda: None) is None


@pytest.mark.slow
def test_a_killed_ssh_comes_back_by_itself(tunnel: TunnelProcess) -> None:
    with tunnel.client() as client:
        assert client.run(lambda: 41) == 41  # the session's WebSocket is open before the kill
        old = tunnel.ssh_child()
        old.kill()
        killed = time.monotonic()
        # New connections, as a fresh notebook call would open: up again when one gets an answer.
        while True:
            try:
                with tunnel.client() as probe:
                    probe.health()
                break
            except ConnectionError:
                assert time.monotonic() - killed < 20, "".join(tunnel.output)
                time.sleep(0.005)
        back_s = time.monotonic() - killed
        line = tunnel.wait_for("reconnected in")
        assert "SIGKILL" in line
        assert tunnel.ssh_child().pid != old.pid
        # The Client made before the kill carries on: HTTP reconnects, the session resumes.
        assert client.models() == []
        assert client.run(lambda: 42) == 42
    print(f"\ntunnel back {back_s * 1e3:.0f} ms after its ssh was killed; it said: {line.strip()}")


@pytest.mark.slow
def test_a_hung_ssh_is_replaced(tunnel: TunnelProcess) -> None:
    # A stopped ssh still holds its port (the kernel accepts into the backlog), but nothing
    # answers: the next /health probe times out and the tunnel replaces it.
    hung = tunnel.ssh_child()
    hung.suspend()
    try:
        line = tunnel.wait_for("reconnected in", timeout=40)
    finally:
        if hung.is_running():
            hung.resume()
    assert "no answer through the tunnel" in line
    assert not hung.is_running() or hung.status() == psutil.STATUS_ZOMBIE
    with tunnel.client() as client:
        assert client.models() == []


@pytest.mark.slow
def test_a_remote_without_a_token_still_gets_a_tunnel(
        sshd: SSHServer, remote_server: ServerProcess, tmp_path: Path) -> None:  # noqa: F811
    empty_home = tmp_path / "no-server-here"
    empty_home.mkdir()
    tunnel = TunnelProcess(sshd, remote_server, tmp_path / "local-home", remote_home=empty_home)
    try:
        warning = tunnel.wait_for("no token at")
        tunnel.wait_for(" up: ")
    finally:
        assert tunnel.stop() == 0
    assert f"{empty_home}/token" in warning and "local token file is unchanged" in warning
    assert not tunnel.token_file.exists()


@pytest.mark.slow
def test_ctrl_c_and_sigterm_stop_it_cleanly(
        sshd: SSHServer, remote_server: ServerProcess, tmp_path: Path) -> None:  # noqa: F811
    for sig in (signal.SIGINT, signal.SIGTERM):
        tunnel = TunnelProcess(sshd, remote_server, tmp_path / "local-home")
        tunnel.wait_for(" up: ")
        ssh = tunnel.ssh_child()
        assert tunnel.stop(sig) == 0
        assert tunnel.output[-1].strip() == "mymps tunnel: stopped."
        ssh.wait(5)  # gone: psutil raises TimeoutExpired if not


@pytest.mark.slow
def test_check_reports_up_and_down(tunnel: TunnelProcess) -> None:
    up = mymps("tunnel", "--check", "--local-port", str(tunnel.local_port), env=tunnel.env)
    assert up.returncode == 0, up.stdout + up.stderr
    assert up.stdout.startswith("mymps tunnel: up at ") and up.stdout.count("\n") == 1
    tunnel.stop()
    down = mymps("tunnel", "--check", "--local-port", str(tunnel.local_port), env=tunnel.env)
    assert down.returncode == 1
    assert down.stdout.startswith("mymps tunnel: down: ") and down.stdout.count("\n") == 1


@pytest.mark.slow
def test_check_names_a_refused_token(tunnel: TunnelProcess) -> None:
    tunnel.token_file.write_text("not-the-token\n")
    refused = mymps("tunnel", "--check", "--local-port", str(tunnel.local_port), env=tunnel.env)
    assert refused.returncode == 1
    assert "refused the token" in refused.stdout and "not-the-token" not in refused.stdout


@pytest.mark.slow
def test_a_wrong_key_fails_in_one_line(sshd: SSHServer, remote_server: ServerProcess, tmp_path: Path) -> None:  # noqa: F811
    other_key = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)], check=True)
    options = [*sshd.mymps_options]
    options[options.index("-i") + 1] = str(other_key)
    done = mymps("tunnel", sshd.destination, *options, "--local-port", str(free_port()),
                 "--remote-port", str(remote_server.port), env=_environment(tmp_path / "home"))
    assert done.returncode == 1
    assert done.stderr.startswith("mymps tunnel: cannot ssh to ") and done.stderr.count("\n") == 1
    assert "Permission denied" in done.stderr


def test_no_host_is_one_clear_line(tmp_path: Path) -> None:
    done = mymps("tunnel", env=_environment(tmp_path))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == "mymps tunnel: no host given; pass user@host, or set MYMPS_HOST (and MYMPS_USER).\n"


def test_a_bad_port_variable_is_named(tmp_path: Path) -> None:
    done = mymps("tunnel", "somehost", env={**_environment(tmp_path), "MYMPS_SSH_PORT": "twenty-two"})
    assert done.returncode == 2
    assert "MYMPS_SSH_PORT must be a port number" in done.stderr


def test_scripts_tunnel_sh_is_the_same_command(tmp_path: Path) -> None:
    done = subprocess.run([str(REPO_ROOT / "scripts" / "tunnel.sh")], env=_environment(tmp_path),
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert done.stderr == "mymps tunnel: no host given; pass user@host, or set MYMPS_HOST (and MYMPS_USER).\n"
