"""Settings from env vars and flags, the token file, and refusals at start-up."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from kernel_server.__main__ import settings_from
from kernel_server.auth import load_or_create_token
from kernel_server.errors import DeviceError, ServerError, ServerStartError, TokenFileError
from kernel_server.settings import Settings, SettingsError, parse_size
from kit import REPO_ROOT, MakeServer
from mymps_magic.cli.localserver import free_port


def test_env_vars_fill_every_option(tmp_path: Path) -> None:
    env = {
        "MYMPS_BIND": "127.0.0.2", "MYMPS_PORT": "6000", "MYMPS_DEVICE": "cpu",
        "MYMPS_HOME": str(tmp_path), "MYMPS_TOKEN_FILE": str(tmp_path / "tok"),
        "MYMPS_ALLOW_REMOTE": "1", "MYMPS_MAX_BODY": "512MiB",
    }
    s = Settings.from_env(env)
    assert (s.host, s.port, s.device, s.home) == ("127.0.0.2", 6000, "cpu", tmp_path)
    assert s.resolved_token_file == tmp_path / "tok"
    assert s.allow_remote and s.max_body == 512 * 1024**2


def test_flags_override_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MYMPS_PORT", "6000")
    monkeypatch.setenv("MYMPS_MAX_BODY", "1GiB")
    s = settings_from(["--port", "7000", "--max-body", "2KiB", "--home", str(tmp_path)])
    assert s.port == 7000 and s.max_body == 2048 and s.resolved_token_file == tmp_path / "token"


@pytest.mark.parametrize(("text", "size"), [("4GiB", 4 * 1024**3), ("1000", 1000), ("1.5KiB", 1536), ("2 MB", 2_000_000)])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MYMPS_DEVICE": "tpu"}, "MYMPS_DEVICE: 'tpu' is not one of auto, mps, cuda, cpu"),
        ({"MYMPS_PORT": "http"}, "MYMPS_PORT: 'http' is not a port number"),
        ({"MYMPS_MAX_BODY": "lots"}, "MYMPS_MAX_BODY: 'lots' is not a size"),
        ({"MYMPS_ALLOW_REMOTE": "maybe"}, "MYMPS_ALLOW_REMOTE='maybe': use 1 or 0"),
        ({"MYMPS_BIND": "0.0.0.0"}, "refusing to bind 0.0.0.0"),
    ],
)
def test_bad_values_name_their_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        Settings.from_env(env)


def test_token_file_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "home" / "token"
    first = load_or_create_token(path, None)
    assert len(first) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_token(path, None) == first
    path.chmod(0o644)
    assert load_or_create_token(path, None) == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, "a readable token file is narrowed to 0600"
    assert load_or_create_token(path, "from-env") == "from-env"


def test_made_tokens_can_follow_a_flag_on_a_command_line(tmp_path: Path) -> None:
    """`%mymps connect --token T` (argparse) takes a token that starts with "-" for an option."""
    tokens = [load_or_create_token(tmp_path / f"token-{i}", None) for i in range(300)]
    assert len(set(tokens)) == len(tokens)
    assert not [t for t in tokens if t.startswith("-") or not t.isalnum()]


def test_server_creates_its_token_file_and_never_logs_the_token(make_server: MakeServer) -> None:
    server = make_server(token_file=True)
    token_file = server.home / "token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert httpx.get(f"{server.url}/models").status_code == 401
    ok = httpx.get(f"{server.url}/models", headers={"Authorization": f"Bearer {server.token}"})
    assert ok.status_code == 200
    health = httpx.get(f"{server.url}/health").text
    server.stop()
    assert server.token not in server.log_text()
    assert server.token not in (server.home / "server.log").read_text()
    assert server.token not in health


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kernel_server", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )


def test_non_loopback_host_is_refused_in_one_line(tmp_path: Path) -> None:
    result = _serve("--host", "0.0.0.0", "--port", str(free_port()), "--home", str(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--allow-remote" in lines[0], result.stderr


def test_a_busy_port_is_refused_in_one_line(make_server: MakeServer, tmp_path: Path) -> None:
    server = make_server()
    result = _serve("--port", str(server.port), "--home", str(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{server.port}" in lines[0], result.stderr


def test_an_empty_token_file_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("")
    result = _serve("--port", str(free_port()), "--home", str(tmp_path), "--device", "cpu")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"the token file {tmp_path / 'token'} is empty" in lines[0], result.stderr


def test_every_start_up_failure_is_a_server_start_error() -> None:
    assert all(issubclass(cls, ServerStartError) for cls in (SettingsError, DeviceError, TokenFileError))
    assert not issubclass(ServerError, ServerStartError)


@pytest.mark.parametrize(("variable", "bad", "flag", "good", "field", "value"), [
    ("MYMPS_BIND", "0.0.0.0", "--host", "127.0.0.1", "host", "127.0.0.1"),
    ("MYMPS_PORT", "http", "--port", "7001", "port", 7001),
    ("MYMPS_DEVICE", "tpu", "--device", "cpu", "device", "cpu"),
    ("MYMPS_MAX_BODY", "lots", "--max-body", "1MiB", "max_body", 1024**2),
    ("MYMPS_SESSION_IDLE", "forever", "--session-idle", "60", "session_idle", 60.0),
    ("MYMPS_PRELOAD", "gpt2:nonsense", "--preload", "gpt2", "preload", (("gpt2", "detect", "auto"),)),
    ("MYMPS_ALLOW_REMOTE", "maybe", "--allow-remote", None, "allow_remote", True),
    ("MYMPS_RESTORE", "perhaps", "--restore", None, "restore", True),
])
def test_a_flag_wins_over_its_variable_without_reading_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, bad: str, flag: str, good: str | None, field: str, value: object,
) -> None:
    """A value the variable would refuse does not matter when the flag overrides it."""
    monkeypatch.setenv(variable, bad)
    with pytest.raises(SettingsError, match=variable):
        settings_from([])
    s = settings_from([flag] if good is None else [flag, good])
    assert getattr(s, field) == value


def test_home_and_token_file_flags_win_over_their_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MYMPS_HOME", str(tmp_path / "env-home"))
    monkeypatch.setenv("MYMPS_TOKEN_FILE", str(tmp_path / "env-token"))
    s = settings_from(["--home", str(tmp_path / "flag-home"), "--token-file", str(tmp_path / "flag-token")])
    assert (s.home, s.resolved_token_file) == (tmp_path / "flag-home", tmp_path / "flag-token")


def test_a_refusal_names_the_flag_when_the_value_came_from_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MYMPS_DEVICE", "cpu")
    monkeypatch.setenv("MYMPS_ALLOW_REMOTE", "1")
    with pytest.raises(SettingsError, match="--port: 70000 is not a TCP port"):
        settings_from(["--port", "70000"])
    monkeypatch.delenv("MYMPS_ALLOW_REMOTE")
    with pytest.raises(SettingsError, match=r"refusing to bind 0\.0\.0\.0 \(--host\)"):
        settings_from(["--host", "0.0.0.0"])


def test_serve_with_a_remote_bind_in_the_environment_starts_on_the_loopback_flag(make_server: MakeServer) -> None:
    """`MYMPS_BIND=0.0.0.0 mymps serve --host 127.0.0.1` (and a stale MYMPS_PORT) serves on loopback."""
    server = make_server(env={"MYMPS_BIND": "0.0.0.0", "MYMPS_PORT": "not-a-port"})
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
