"""A real OpenSSH server on a loopback port, for the tests and benchmarks of `mymps tunnel` and
`mymps deploy`.

The tunnel and the deploy are ssh and rsync driven as subprocesses; the only honest test runs
them against a real ``sshd``. This module starts OpenSSH's own ``/usr/sbin/sshd`` as a child
process with a throwaway host key, a throwaway client key and its own ``authorized_keys``, all in
a temporary directory, and gives the client options that keep ``~/.ssh`` and the system's sshd
configuration out of it. It installs nothing: ``scripts/dev.sh`` installs OpenSSH and rsync, and
the `sshd` fixture skips, saying so, where they are missing.

The test files use it as ``from sshd import SSHServer, sshd  # noqa: F401`` (the fixture must be
a name in the test module for pytest to find it).
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Iterator, Mapping

import pytest

from mymps_magic.cli.localserver import free_port

__all__ = ["SSHD", "SSHServer", "SSHStartError", "missing_tools", "sshd"]

SSHD = Path("/usr/sbin/sshd")
"""OpenSSH's server, run by absolute path as sshd itself demands (it re-executes itself)."""

_START_TIMEOUT_S = 15.0


class SSHStartError(RuntimeError):
    """sshd did not accept a login; the message ends with its log."""


def missing_tools() -> str | None:
    """Why the ssh tests cannot run here, or None when sshd, ssh and ssh-keygen are installed."""
    if not SSHD.exists():
        return f"OpenSSH's server is not installed ({SSHD}); scripts/dev.sh installs openssh-server"
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed; scripts/dev.sh installs openssh-client"
    return None


class SSHServer:
    """OpenSSH's ``sshd`` on ``127.0.0.1:PORT``, letting in one temporary key as the current user.

    The server reads no configuration file (``-f /dev/null``): every setting is on its command
    line, so the machine's ``/etc/ssh/sshd_config`` (PAM, banners, ``Include``) plays no part.
    Its log (``-e``: to stderr) goes to ``DIRECTORY/sshd.log``.

    Args:
        directory: holds the keys, ``authorized_keys``, ``known_hosts`` and the log; created if
            missing.
        set_env: variables sshd sets in every session it starts (its ``SetEnv``), as a remote
            machine's own environment would.
    """

    def __init__(self, directory: str | Path, *, set_env: Mapping[str, str] | None = None) -> None:
        self.directory = Path(directory)
        self.port = free_port()
        self.user = getpass.getuser()
        self.set_env = dict(set_env or {})
        self.host_key = self.directory / "host_ed25519"
        self.client_key = self.directory / "id_ed25519"
        self.authorized_keys = self.directory / "authorized_keys"
        self.known_hosts = self.directory / "known_hosts"
        self.log_path = self.directory / "sshd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def destination(self) -> str:
        """``user@127.0.0.1``, the ``[user@host]`` argument of `mymps tunnel` and `mymps deploy`."""
        return f"{self.user}@127.0.0.1"

    @property
    def client_options(self) -> list[str]:
        """ssh options that log in with the temporary key and read or write nothing in ``~/.ssh``.

        ``-F /dev/null`` skips ``~/.ssh/config``; ``IdentitiesOnly`` keeps an agent's keys and
        ``~/.ssh/id_*`` out; the known-hosts file is ours; ``BatchMode`` makes a failed login an
        error instead of a password prompt.
        """
        return [
            "-F", "/dev/null",
            "-i", str(self.client_key),
            "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=no",
            "-o", "LogLevel=ERROR",
        ]

    @property
    def mymps_options(self) -> list[str]:
        """The same, as `mymps tunnel` and `mymps deploy` take them, plus ``-p PORT``."""
        return ["-p", str(self.port), *self.client_options]

    def ssh(self, *remote_command: str) -> list[str]:
        """The ``ssh`` command line that runs ``remote_command`` on this server."""
        return ["ssh", "-p", str(self.port), *self.client_options, self.destination, *remote_command]

    @property
    def command(self) -> list[str]:
        """The ``sshd`` command line that `start` runs."""
        options = {
            "ListenAddress": "127.0.0.1",
            "HostKey": str(self.host_key),
            "AuthorizedKeysFile": str(self.authorized_keys),
            # The temporary directory is not owned the way StrictModes wants ~/.ssh to be.
            "StrictModes": "no",
            "PidFile": "none",
            "PubkeyAuthentication": "yes",
            "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no",
            "PermitRootLogin": "prohibit-password",
            "AllowTcpForwarding": "yes",
            "PrintMotd": "no",
            "PrintLastLog": "no",
        }
        # SHLVL=2 keeps bash from sourcing ~/.bashrc for ssh commands (Debian's bash does so only
        # at shell level 1): a developer's rc file (pyenv's rehash, with its lock file) must not
        # slow or hang the tests' remote commands.
        session_env = {"SHLVL": "2", **self.set_env}
        options["SetEnv"] = " ".join(f"{name}={value}" for name, value in session_env.items())
        args = [str(SSHD), "-D", "-e", "-f", "/dev/null", "-p", str(self.port)]
        for name, value in options.items():
            args += ["-o", f"{name}={value}"]
        return args

    def start(self) -> SSHServer:
        """Make the keys, start sshd and wait until a login through it works.

        Returns:
            ``self``.

        Raises:
            SSHStartError: sshd exited, or no login worked within 15 s; the message has its log.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            # sshd run by root checks for its privilege separation directory (Debian: /run/sshd,
            # made by the service unit that this test does not use).
            Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        for key in (self.host_key, self.client_key):
            if not key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mymps-test", "-f", str(key)],
                               check=True, stdin=subprocess.DEVNULL)
        self.authorized_keys.write_text(self.client_key.with_suffix(".pub").read_text())
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            returncode = self.process.poll()
            if returncode is not None:
                self.stop()
                raise SSHStartError(f"sshd exited with status {returncode}\n{self.log_text()}")
            if _accepts(self.port) and subprocess.run(self.ssh("true"), stdin=subprocess.DEVNULL,
                                                      capture_output=True, timeout=10).returncode == 0:
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise SSHStartError(f"no login through sshd on port {self.port} in {_START_TIMEOUT_S:g} s\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop sshd (sessions it started end with it). Safe to call twice."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        """What sshd has logged so far, or ``""``."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> SSHServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """A real sshd for the module's tests; skipped, saying why, where OpenSSH is not installed."""
    reason = missing_tools()
    if reason is not None:
        pytest.skip(reason)
    with SSHServer(tmp_path_factory.mktemp("sshd")) as server:
        yield server
