"""``mymps service install|uninstall|status|logs``: the server as a login service.

`supervise` brings the server back after a crash of its device process; this makes the OS's own
supervisor start ``mymps serve --restore`` at login and start it again if the supervisor itself
ends badly (a crash loop it gave up on, a kill): so the accelerator is there after a reboot or a
crash without anyone at the Mac.

- macOS: a launchd agent, ``~/Library/LaunchAgents/mymps.server.plist``, with ``RunAtLoad`` and
  ``KeepAlive`` (``SuccessfulExit`` false: a clean stop stays stopped), loaded with
  ``launchctl bootstrap gui/UID``. launchd has no log of its own for agents: stdout and stderr go
  to ``service.log`` in the server's home (``MYMPS_HOME``), beside ``server.log``.
- Linux: a systemd user unit, ``~/.config/systemd/user/mymps.service`` (``$XDG_CONFIG_HOME``),
  ``Restart=on-failure``, ``KillMode=mixed`` (systemd's SIGTERM goes to the supervisor alone,
  which forwards it: the server gets one, a clean stop, not two, a forced one), output appended
  to the same ``service.log``; enabled with ``systemctl --user enable --now``. Where no user
  manager runs (a container, an ssh session without lingering), install writes the unit and
  says in one line how to enable it.

Both run this interpreter (``sys.executable -m mymps_magic.cli serve --restore``) with the
options given to ``install``, checked as ``mymps serve`` checks them, and the ``PATH`` of the shell
that installed it (a login service's own is bare; a cell's ``!cmd`` uses it). Other environment
variables are not carried: give ``MYMPS_*`` settings as options. The files are 0600: they name the
user's paths and options and are nobody else's business.
"""

from __future__ import annotations

import argparse
import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["LABEL", "UNIT", "launchd_plist", "run", "service_command", "service_file", "systemd_unit"]

LABEL = "mymps.server"
UNIT = "mymps.service"
LOG_NAME = "service.log"


def service_command(server_options: Sequence[str]) -> list[str]:
    """The service's command line: this interpreter's ``mymps serve --restore`` and the options."""
    return [sys.executable, "-m", "mymps_magic.cli", "serve", "--restore", *server_options]


def systemd_unit(command: Sequence[str], log: Path, path: str) -> str:
    """The systemd user unit's text (see the module docstring for each setting's reason)."""
    # systemd reads %-specifiers and $VARIABLES in ExecStart: a literal % is %%, a literal $ is $$.
    exec_start = " ".join(shlex.quote(arg) for arg in command).replace("%", "%%").replace("$", "$$")
    return "\n".join([
        "[Unit]",
        "Description=mymps server: this machine's accelerator for Jupyter notebooks",
        "After=network.target",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={exec_start}",
        "Restart=on-failure",
        "RestartSec=5",
        "KillMode=mixed",
        "TimeoutStopSec=30",
        "WorkingDirectory=~",
        f"Environment={shlex.quote('PATH=' + path).replace('%', '%%')}",
        f"StandardOutput=append:{log}",
        f"StandardError=append:{log}",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ])


def launchd_plist(command: Sequence[str], log: Path, path: str) -> bytes:
    """The launchd agent's plist (XML), as ``launchctl`` reads it."""
    return plistlib.dumps({
        "Label": LABEL,
        "ProgramArguments": list(command),
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ProcessType": "Interactive",  # a server answering notebooks: not throttled as background work
        "WorkingDirectory": str(Path.home()),
        "EnvironmentVariables": {"PATH": path},
        "StandardOutPath": str(log),
        "StandardErrorPath": str(log),
    })


def service_file(platform: str = sys.platform) -> Path:
    """Where the service's file goes for ``platform`` (``sys.platform``'s spelling)."""
    if platform == "darwin":
        return Path.home() / "Library" / "LaunchAgents" / f"{LABEL}.plist"
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user" / UNIT


def run(argv: list[str]) -> int:
    """``mymps service ACTION ...``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="mymps service", description="Run the server as a login service "
                                     "(launchd on macOS, a systemd user unit on Linux), restarted when it fails.")
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("install", add_help=False, help="install and start it; the options after are mymps serve's "
                       "(e.g. mymps service install --port 5555 --device mps)")
    actions.add_parser("uninstall", help="stop it and remove it")
    actions.add_parser("status", help="whether it is installed, and what the OS's supervisor says of it")
    logs = actions.add_parser("logs", help=f"the end of its log ({LOG_NAME} in the server's home)")
    logs.add_argument("-n", "--lines", type=int, default=50, help="how many lines (default 50)")
    args, rest = parser.parse_known_args(argv)
    if args.action == "install":
        return _install(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.action == "uninstall":
        return _uninstall()
    if args.action == "status":
        return _status()
    return _logs(args.lines)


def _install(options: list[str]) -> int:
    from kernel_server.__main__ import settings_from
    from kernel_server.errors import ServerStartError

    try:
        settings = settings_from(options)
    except ServerStartError as exc:
        print(f"mymps service: {exc}", file=sys.stderr)
        return 2
    home = settings.home.resolve()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    if "--home" not in options:  # the home this shell resolved (its MYMPS_HOME is not carried)
        options = [*options, "--home", str(home)]
    log, command, path = home / LOG_NAME, service_command(options), os.environ.get("PATH", os.defpath)
    file = service_file()
    darwin = sys.platform == "darwin"
    content = launchd_plist(command, log, path) if darwin else systemd_unit(command, log, path).encode()
    file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(content)
    file.chmod(0o600)  # an older file keeps its mode through O_TRUNC
    if darwin:
        _launchctl("bootout", f"gui/{os.getuid()}/{LABEL}")  # a previous install's agent, if any
        done = _launchctl("bootstrap", f"gui/{os.getuid()}", str(file))
        if done.returncode != 0:
            print(f"mymps service: wrote {file}, but launchctl bootstrap failed: {done.stderr.strip()}",
                  file=sys.stderr)
            return 1
        print(f"mymps service: installed and started {LABEL} ({file}); its log: {log}")
        return 0
    enable = f"systemctl --user daemon-reload && systemctl --user enable --now {UNIT}"
    if not _systemd_user():
        print(f"mymps service: wrote {file}; no systemd user manager answers here, so enable it where one runs "
              f"with `{enable}` (and `loginctl enable-linger` to start it at boot)")
        return 0
    for step in (["daemon-reload"], ["enable", "--now", UNIT]):
        done = _systemctl(*step)
        if done.returncode != 0:
            print(f"mymps service: wrote {file}, but systemctl --user {' '.join(step)} failed: "
                  f"{done.stderr.strip()}", file=sys.stderr)
            return 1
    print(f"mymps service: installed and started {UNIT} ({file}); its log: {log}")
    return 0


def _uninstall() -> int:
    file = service_file()
    if not file.exists():
        print(f"mymps service: not installed (no {file})", file=sys.stderr)
        return 1
    managed = sys.platform == "darwin" or _systemd_user()
    if sys.platform == "darwin":
        _launchctl("bootout", f"gui/{os.getuid()}/{LABEL}")
    elif managed:
        _systemctl("disable", "--now", UNIT)
    file.unlink()
    if sys.platform != "darwin" and managed:
        _systemctl("daemon-reload")
    print(f"mymps service: {'stopped and ' if managed else ''}removed {file}")
    return 0


def _status() -> int:
    file = service_file()
    if not file.exists():
        print(f"mymps service: not installed (no {file})")
        return 1
    if sys.platform == "darwin":
        done = _launchctl("print", f"gui/{os.getuid()}/{LABEL}")
        state = next((line.strip() for line in done.stdout.splitlines() if line.strip().startswith("state =")),
                     "not loaded")
    elif _systemd_user():
        state = "state = " + (_systemctl("is-active", UNIT).stdout.strip() or "unknown")
    else:
        state = "no systemd user manager answers here"
    print(f"mymps service: installed ({file}); {state}; log: {_log_of(file)}")
    return 0


def _logs(lines: int) -> int:
    file = service_file()
    if not file.exists():
        print(f"mymps service: not installed (no {file})", file=sys.stderr)
        return 1
    log = _log_of(file)
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        print(f"mymps service: {log} does not exist yet: the service has not written to it", file=sys.stderr)
        return 1
    sys.stdout.write("".join(text.splitlines(keepends=True)[-lines:]))
    return 0


def _log_of(file: Path) -> Path:
    """The log the installed file names (its home was fixed at install time)."""
    if file.suffix == ".plist":
        return Path(plistlib.loads(file.read_bytes())["StandardOutPath"])
    line = next(line for line in file.read_text().splitlines() if line.startswith("StandardOutput=append:"))
    return Path(line.removeprefix("StandardOutput=append:"))


def _systemd_user() -> bool:
    """Whether a systemd user manager answers (not in most containers, nor without a login session)."""
    return shutil.which("systemctl") is not None and _systemctl("show-environment").returncode == 0


def _systemctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemctl", "--user", *args], capture_output=True, text=True, check=False)


def _launchctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["launchctl", *args], capture_output=True, text=True, check=False)
