"""Where the dashboard listens: flags over ``MYMPS_DASH_*`` over 127.0.0.1:8080, read once.

The dashboard holds the server's token and can load, unload, cancel and generate with it, so,
like the server itself, it listens on loopback unless told otherwise.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from mymps_magic.errors import CommandError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_REFRESH_S = 5.0


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``localhost`` or a loopback address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class DashboardSettings:
    """The dashboard's own address and refresh period (the server's come from `Client`).

    Attributes:
        host: the address to bind.
        port: the port to bind.
        allow_remote: bind a non-loopback address too (``--allow-remote``).
        refresh_s: how often an open page refreshes itself.
    """

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    allow_remote: bool = False
    refresh_s: float = DEFAULT_REFRESH_S

    @classmethod
    def resolve(cls, environ: Mapping[str, str], host: str | None = None, port: int | None = None, *,
                allow_remote: bool = False, refresh_s: float = DEFAULT_REFRESH_S) -> DashboardSettings:
        """Apply the flags over ``MYMPS_DASH_HOST``/``MYMPS_DASH_PORT`` over the defaults.

        Args:
            environ: the environment to read.
            host, port: the ``--host``/``--port`` flags; None means "look further".
            allow_remote: the ``--allow-remote`` flag.
            refresh_s: the ``--refresh`` flag, in seconds.

        Returns:
            The checked settings.

        Raises:
            CommandError: a port that is not a port, a refresh period that is not positive, or a
                non-loopback host without ``allow_remote``; the message names the flag or variable.
        """
        host_source = "--host" if host else "MYMPS_DASH_HOST"
        resolved_host = host or environ.get("MYMPS_DASH_HOST") or DEFAULT_HOST
        resolved_port = port if port is not None else _port(environ.get("MYMPS_DASH_PORT"))
        if not 0 <= resolved_port < 65536:
            raise CommandError(f"port {resolved_port} is not a TCP port (0-65535); give --port or MYMPS_DASH_PORT")
        if refresh_s <= 0:
            raise CommandError(f"--refresh {refresh_s}: give a positive number of seconds")
        if not allow_remote and not is_loopback(resolved_host):
            raise CommandError(
                f"refusing to bind {resolved_host} ({host_source}): the dashboard acts on the server with its "
                "token, so it listens on loopback only; pass --allow-remote if you really mean it"
            )
        return cls(resolved_host, resolved_port, allow_remote, refresh_s)


def _port(text: str | None) -> int:
    if not text:
        return DEFAULT_PORT
    try:
        return int(text)
    except ValueError:
        raise CommandError(f"MYMPS_DASH_PORT={text!r} is not a port number; give one in 1-65535") from None
