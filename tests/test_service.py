"""`mymps service`: the launchd agent and the systemd user unit it writes (content, paths,
permissions), and install/status/logs/uninstall where no user manager runs (this machine, CI).
(The command both run, `mymps serve`, is test_supervisor's.)"""

from __future__ import annotations

import plistlib
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from kit import QUIET_ENV, REPO_ROOT

from mymps_magic.cli import service


def mymps(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``mymps ARGS`` with ``HOME`` and ``XDG_CONFIG_HOME`` in ``tmp_path``, and no ``systemctl`` on
    the PATH: whatever runs the tests, no real login service is touched."""
    empty = tmp_path / "bin"
    empty.mkdir(exist_ok=True)
    env = {**QUIET_ENV, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "config"), "PATH": str(empty)}
    return subprocess.run([sys.executable, "-m", "mymps_magic.cli", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, check=False)


def test_the_systemd_unit_restarts_on_failure_with_restore(tmp_path: Path) -> None:
    log = tmp_path / "home" / "service.log"
    unit = service.systemd_unit(service.service_command(["--port", "5999"]), log, "/usr/bin:/bin")
    lines = unit.splitlines()
    exec_start = next(line for line in lines if line.startswith("ExecStart="))
    assert shlex.split(exec_start.removeprefix("ExecStart=")) == [
        sys.executable, "-m", "mymps_magic.cli", "serve", "--restore", "--port", "5999"]
    for setting in ("Restart=on-failure", "KillMode=mixed", f"StandardOutput=append:{log}",
                    f"StandardError=append:{log}", "WantedBy=default.target", "Environment=PATH=/usr/bin:/bin"):
        assert setting in lines


def test_the_systemd_unit_escapes_what_systemd_would_expand() -> None:
    unit = service.systemd_unit(["/opt/py 3/python", "--home", "/h/100%/$HOME"], Path("/l"), "/bin")
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start == "ExecStart='/opt/py 3/python' --home '/h/100%%/$$HOME'"


def test_the_launchd_plist_keeps_the_server_alive_with_restore(tmp_path: Path) -> None:
    log = tmp_path / "home" / "service.log"
    text = service.launchd_plist(service.service_command(["--device", "mps"]), log, "/usr/bin:/bin")
    assert text.startswith(b"<?xml") and b"<!DOCTYPE plist" in text
    agent = plistlib.loads(text)
    assert agent["Label"] == "mymps.server"
    assert agent["ProgramArguments"] == [sys.executable, "-m", "mymps_magic.cli", "serve", "--restore",
                                         "--device", "mps"]
    assert agent["RunAtLoad"] is True and agent["KeepAlive"] == {"SuccessfulExit": False}
    assert agent["StandardOutPath"] == agent["StandardErrorPath"] == str(log)
    assert agent["EnvironmentVariables"] == {"PATH": "/usr/bin:/bin"}


def test_service_files_go_where_the_managers_look(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    assert service.service_file("darwin") == tmp_path / "Library" / "LaunchAgents" / "mymps.server.plist"
    assert service.service_file("linux") == tmp_path / ".config" / "systemd" / "user" / "mymps.service"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert service.service_file("linux") == tmp_path / "xdg" / "systemd" / "user" / "mymps.service"


@pytest.mark.skipif(sys.platform == "darwin", reason="the systemd unit: Linux")
def test_install_without_a_user_manager_writes_the_unit_and_says_how_to_enable_it(tmp_path: Path) -> None:
    home = tmp_path / "mymps-home"
    done = mymps(tmp_path, "service", "install", "--port", "5999", "--home", str(home))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and "systemctl --user enable --now mymps.service" in done.stdout
    unit = tmp_path / "config" / "systemd" / "user" / "mymps.service"
    assert unit.stat().st_mode & 0o777 == 0o600
    text = unit.read_text()
    assert f"--restore --port 5999 --home {home}\n" in text and f"append:{home / 'service.log'}" in text

    status = mymps(tmp_path, "service", "status")
    assert status.returncode == 0 and f"installed ({unit})" in status.stdout
    assert mymps(tmp_path, "service", "logs").returncode == 1  # nothing written yet: one line says so
    (home / "service.log").write_text("".join(f"line {n}\n" for n in range(100)))
    logs = mymps(tmp_path, "service", "logs", "-n", "3")
    assert logs.returncode == 0 and logs.stdout == "line 97\nline 98\nline 99\n"

    gone = mymps(tmp_path, "service", "uninstall")
    assert gone.returncode == 0 and not unit.exists()
    assert mymps(tmp_path, "service", "status").returncode == 1
    assert mymps(tmp_path, "service", "uninstall").returncode == 1


def test_install_with_a_bad_option_writes_nothing(tmp_path: Path) -> None:
    done = mymps(tmp_path, "service", "install", "--port", "70000")
    assert done.returncode == 2 and done.stderr == "mymps service: --port: 70000 is not a TCP port (0-65535)\n"
    assert not (tmp_path / "config").exists() and not (tmp_path / "Library").exists()
