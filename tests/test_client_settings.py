"""Where a `Client` finds its server and token: arguments, environment, token file, defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from mymps_magic import AuthError, BadRequestError, Client
from mymps_magic._settings import Settings


def test_defaults_without_environment(tmp_path: Path) -> None:
    settings = Settings.resolve(environ={"MYMPS_HOME": str(tmp_path)})
    assert (settings.host, settings.port) == ("127.0.0.1", 5555)
    assert settings.token is None and settings.token_source == "none"


def test_server_host_and_port_from_environment(tmp_path: Path) -> None:
    env = {"MYMPS_SERVER_HOST": "localhost", "MYMPS_SERVER_PORT": "6000", "MYMPS_PORT": "7000", "MYMPS_HOME": str(tmp_path)}
    settings = Settings.resolve(environ=env)
    assert (settings.host, settings.port) == ("localhost", 6000)


def test_mymps_port_is_the_fallback_port(tmp_path: Path) -> None:
    assert Settings.resolve(environ={"MYMPS_PORT": "7000", "MYMPS_HOME": str(tmp_path)}).port == 7000


def test_arguments_win_over_environment(tmp_path: Path) -> None:
    env = {"MYMPS_SERVER_HOST": "localhost", "MYMPS_SERVER_PORT": "6000", "MYMPS_TOKEN": "from-env"}
    settings = Settings.resolve("10.0.0.2", 6001, "from-arg", environ=env)
    assert (settings.host, settings.port, settings.token, settings.token_source) == ("10.0.0.2", 6001, "from-arg", "argument")


@pytest.mark.parametrize(("variable", "value"), [("MYMPS_SERVER_PORT", "http"), ("MYMPS_PORT", "70000")])
def test_a_bad_port_names_its_variable(variable: str, value: str) -> None:
    with pytest.raises(BadRequestError, match=variable):
        Settings.resolve(environ={variable: value})


def test_token_from_environment_beats_the_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("from-file\n")
    settings = Settings.resolve(environ={"MYMPS_TOKEN": "from-env", "MYMPS_HOME": str(tmp_path)})
    assert (settings.token, settings.token_source) == ("from-env", "MYMPS_TOKEN")


def test_token_from_the_home_token_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("from-file\n")
    settings = Settings.resolve(environ={"MYMPS_HOME": str(tmp_path)})
    assert (settings.token, settings.token_source) == ("from-file", str(tmp_path / "token"))


def test_token_file_variable_beats_the_home_token_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("home")
    (tmp_path / "other").write_text("other")
    env = {"MYMPS_HOME": str(tmp_path), "MYMPS_TOKEN_FILE": str(tmp_path / "other")}
    assert Settings.resolve(environ=env).token == "other"


def test_the_token_never_shows_in_a_repr(tmp_path: Path) -> None:
    settings = Settings.resolve(token="s3cret-token", environ={})
    client = Client(port=5555, token="s3cret-token")
    try:
        assert "s3cret-token" not in repr(settings) + repr(client) + repr(client.settings)
    finally:
        client.close()


def test_client_reads_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "token").write_text("file-token")
    monkeypatch.delenv("MYMPS_TOKEN", raising=False)
    monkeypatch.delenv("MYMPS_TOKEN_FILE", raising=False)
    monkeypatch.setenv("MYMPS_HOME", str(tmp_path))
    monkeypatch.setenv("MYMPS_SERVER_HOST", "localhost")
    monkeypatch.setenv("MYMPS_SERVER_PORT", "6123")
    with Client() as client:
        assert (client.host, client.port, client.settings.token) == ("localhost", 6123, "file-token")
    monkeypatch.setenv("MYMPS_TOKEN", "env-token")
    with Client(port=6124) as client:
        assert (client.port, client.settings.token) == (6124, "env-token")


def test_an_explicit_token_file_beats_the_environment_and_names_itself(tmp_path: Path) -> None:
    (tmp_path / "named").write_text("named-token\n")
    settings = Settings.resolve(environ={"MYMPS_TOKEN": "from-env"}, token_file=tmp_path / "named")
    assert (settings.token, settings.token_source, settings.token_file) == (
        "named-token", str(tmp_path / "named"), tmp_path / "named")


def test_a_missing_explicit_token_file_is_one_line_naming_it(tmp_path: Path) -> None:
    with pytest.raises(AuthError, match=f"The token file {tmp_path / 'absent'} does not exist"):
        Settings.resolve(environ={}, token_file=tmp_path / "absent")
