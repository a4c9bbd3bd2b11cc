"""What `mymps tunnel` connects: the remote machine and the two ports, resolved once from the flags
over the environment, and where the fetched token lands."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mymps_magic._settings import default_token_file as local_token_file
from mymps_magic._settings import resolve_port
from mymps_magic.cli.ssh import SSH, remote_path

LOCAL_HOST = "127.0.0.1"


@dataclass(frozen=True)
class TunnelSettings:
    """What `mymps tunnel` needs, resolved once from its flags over the environment.

    Attributes:
        ssh: the remote machine.
        local_port: the local end (``--local-port``, else ``MYMPS_SERVER_PORT``, else
            ``MYMPS_PORT``, else 5555): where `Client` looks by default.
        remote_port: the server's port there (``--remote-port``, else ``MYMPS_PORT``, else 5555).
        remote_home: the server's ``MYMPS_HOME`` there; None means the remote's own
            ``$MYMPS_HOME``, else ``~/.mymps``.
        token_file: the local token file the token is copied into.
    """

    ssh: SSH
    local_port: int
    remote_port: int
    remote_home: str | None
    token_file: Path

    @classmethod
    def resolve(
        cls,
        destination: str | None,
        *,
        ssh_port: int | None = None,
        ssh_options: Sequence[str] = (),
        local_port: int | None = None,
        remote_port: int | None = None,
        remote_home: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> TunnelSettings:
        """Apply the flags over ``MYMPS_USER``/``MYMPS_HOST``/``MYMPS_SSH_PORT``/``MYMPS_PORT``.

        Raises:
            CommandError: no host.
            BadRequestError: a port that is not a port number (the message names it).
        """
        env = os.environ if environ is None else environ
        return cls(
            ssh=SSH.resolve(destination, ssh_port, ssh_options, env),
            local_port=resolve_local_port(local_port, env),
            remote_port=resolve_port(remote_port, "--remote-port", env, ["MYMPS_PORT"]),
            remote_home=remote_home,
            token_file=local_token_file(env),
        )

    @property
    def local_address(self) -> str:
        return f"{LOCAL_HOST}:{self.local_port}"

    @property
    def remote_address(self) -> str:
        return f"{self.ssh.destination}:{self.remote_port}"

    @property
    def remote_token(self) -> str:
        """The remote token file as a shell word: the remote's ``$MYMPS_HOME`` unless given."""
        home = remote_path(self.remote_home) if self.remote_home else '"${MYMPS_HOME:-$HOME/.mymps}"'
        return f"{home}/token"


def resolve_local_port(flag: int | None, environ: Mapping[str, str] | None = None) -> int:
    """The tunnel's local port: ``--local-port``, else ``MYMPS_SERVER_PORT``, else ``MYMPS_PORT``,
    else 5555 -- the port a `Client` made with no arguments connects to."""
    return resolve_port(flag, "--local-port", os.environ if environ is None else environ)
