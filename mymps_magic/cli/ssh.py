"""How mymps reaches the remote machine with OpenSSH: shared by `mymps tunnel` and `mymps deploy`."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mymps_magic import _settings
from mymps_magic.errors import CommandError

# Every ssh that mymps runs: a config's RemoteCommand or forced terminal must not replace ours,
# and a host that does not answer must not hang a command for minutes.
SSH_BASE_OPTIONS = ("-o", "ConnectTimeout=10", "-o", "RemoteCommand=none")


@dataclass(frozen=True)
class SSH:
    """How to reach the remote machine with ``ssh``, shared by `mymps tunnel` and `mymps deploy`.

    Attributes:
        destination: ``user@host`` or ``host``.
        port: the ssh port, or None for ssh's own default (``~/.ssh/config``, then 22).
        options: the user's pass-through options, flattened (``-o K=V``, ``-i KEY``, ``-F CONFIG``).
            They come first on every command line: ssh keeps the first value it sees for an
            option, so the user's win over mymps's defaults.
    """

    destination: str
    port: int | None = None
    options: tuple[str, ...] = ()

    def args(self, *extra: str) -> list[str]:
        """ssh's options, without the program name and destination (as ``rsync -e`` wants them)."""
        port = ["-p", str(self.port)] if self.port else []
        return [*self.options, *port, *SSH_BASE_OPTIONS, *extra]

    def command(self, *extra: str, remote: str | None = None) -> list[str]:
        """The full ``ssh`` command line, running ``remote`` (a shell command line) if given."""
        return ["ssh", *self.args(*extra), self.destination, *([remote] if remote else [])]

    def run(self, remote: str, *, timeout: float) -> subprocess.CompletedProcess[bytes]:
        """Run one remote command without a terminal, its output captured."""
        return subprocess.run(self.command("-o", "RequestTTY=no", remote=remote), stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout)

    @classmethod
    def resolve(
        cls, destination: str | None, port: int | None, options: Sequence[str], environ: Mapping[str, str]
    ) -> SSH:
        """The flags over ``MYMPS_USER``, ``MYMPS_HOST`` and ``MYMPS_SSH_PORT``.

        Raises:
            CommandError: no host.
            BadRequestError: ``MYMPS_SSH_PORT`` is not a port number.
        """
        if port is None and environ.get("MYMPS_SSH_PORT"):
            port = _settings.parse_port(environ["MYMPS_SSH_PORT"], "MYMPS_SSH_PORT")
        return cls(ssh_destination(destination, environ), port, tuple(options))


def ssh_destination(destination: str | None, environ: Mapping[str, str]) -> str:
    """``user@host`` from the argument, else ``MYMPS_USER`` and ``MYMPS_HOST``; no host is built in.

    Raises:
        CommandError: neither the argument nor ``MYMPS_HOST`` names a host.
    """
    host = destination or environ.get("MYMPS_HOST")
    if not host:
        raise CommandError("no host given; pass user@host, or set MYMPS_HOST (and MYMPS_USER).")
    user = environ.get("MYMPS_USER")
    return f"{user}@{host}" if user and "@" not in host else host


def remote_path(path: str) -> str:
    """``path`` as a remote shell word: ``~/x`` keeps its tilde meaning, the rest is quoted."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)
