"""Where the client finds its server and token: arguments, then environment, then defaults.

This is the only client module that reads the environment, and it does so once, when a `Client`
is made. The token file is read here too, and only when no token was given more directly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mymps_magic.errors import AuthError, BadRequestError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5555
SERVER_PORT_VARIABLES = ("MYMPS_SERVER_PORT", "MYMPS_PORT")
"""Where the local port of the server is set, in order; ``MYMPS_PORT`` is the original's."""


@dataclass(frozen=True)
class Settings:
    """The resolved address and token of the server a `Client` talks to.

    Attributes:
        host: the server's host, usually the local end of the SSH tunnel.
        port: the server's port.
        token: the bearer token, or None when none was found (only ``/health`` works then).
            Left out of ``repr`` so that it never lands in a log or a traceback.
        token_source: where the token came from (``"argument"``, ``"MYMPS_TOKEN"``, a file
            path, or ``"none"``), so an authentication error can say which one to fix.
        token_file: the token file this client reads (or would read): ``MYMPS_TOKEN_FILE``,
            else ``$MYMPS_HOME/token``; hints name it rather than a fixed ``~/.mymps/token``.
    """

    host: str
    port: int
    token: str | None = field(repr=False)
    token_source: str
    token_file: Path | None = None

    @property
    def address(self) -> str:
        """``host:port``, with IPv6 hosts in brackets, as URLs and messages need it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def resolve(
        cls,
        host: str | None = None,
        port: int | str | None = None,
        token: str | None = None,
        environ: Mapping[str, str] | None = None,
        *,
        token_file: str | os.PathLike[str] | None = None,
    ) -> Settings:
        """Apply the arguments over the environment over the defaults.

        Host: ``host``, then ``MYMPS_SERVER_HOST``, then 127.0.0.1. Port: ``port``, then
        ``MYMPS_SERVER_PORT``, then ``MYMPS_PORT`` (the original's tunnel port), then 5555.
        Token: ``token``, then the file ``token_file``, then ``MYMPS_TOKEN``, then the file
        ``MYMPS_TOKEN_FILE``, else ``$MYMPS_HOME/token`` (``MYMPS_HOME`` defaults to ``~/.mymps``).

        Args:
            host, port, token: explicit values; None means "look further".
            environ: the environment to read; ``os.environ`` when None.
            token_file: a file holding the token (``%mymps connect --token-file``); it must
                exist, and hints name it.

        Returns:
            The settings a `Client` uses.

        Raises:
            BadRequestError: a port is not a number in 1..65535; the message names its source.
            AuthError: the token file exists but cannot be read, or an explicit
                ``token_file`` does not exist.
        """
        env = os.environ if environ is None else environ
        resolved_host = host or env.get("MYMPS_SERVER_HOST") or DEFAULT_HOST
        resolved_port = resolve_port(port, "port", env)

        path = Path(token_file).expanduser() if token_file is not None else default_token_file(env)
        if token:
            return cls(resolved_host, resolved_port, token, "argument", path)
        if token_file is not None:
            named = _read_token_file(path)
            if named is None:
                raise AuthError(f"The token file {path} does not exist or is empty. Give the server's token file "
                                "(`mymps tunnel` fetches it), or set MYMPS_TOKEN.")
            return cls(resolved_host, resolved_port, named, str(path), path)
        if env.get("MYMPS_TOKEN"):
            return cls(resolved_host, resolved_port, env["MYMPS_TOKEN"], "MYMPS_TOKEN", path)
        file_token = _read_token_file(path)
        if file_token is None:
            return cls(resolved_host, resolved_port, None, "none", path)
        return cls(resolved_host, resolved_port, file_token, str(path), path)


def default_token_file(environ: Mapping[str, str]) -> Path:
    """Where the client's token lives: ``MYMPS_TOKEN_FILE``, else ``$MYMPS_HOME/token``
    (``MYMPS_HOME`` defaulting to ``~/.mymps``); `mymps tunnel` writes it there."""
    if environ.get("MYMPS_TOKEN_FILE"):
        return Path(environ["MYMPS_TOKEN_FILE"]).expanduser()
    home = Path(environ["MYMPS_HOME"]).expanduser() if environ.get("MYMPS_HOME") else Path.home() / ".mymps"
    return home / "token"


def resolve_port(
    value: int | str | None, source: str, environ: Mapping[str, str], variables: Sequence[str] = SERVER_PORT_VARIABLES
) -> int:
    """``value``, else the first of ``variables`` set in ``environ``, else 5555: the one order
    in which `Client`, `mymps tunnel` and the magics find a port.

    Args:
        value: an explicit port (an argument or flag); None means "look further".
        source: the name of the argument or flag, for the message.
        environ: the environment to read.
        variables: the variables to try, in order.

    Raises:
        BadRequestError: the port found is not a number in 1..65535; the message names its source.
    """
    if value is not None:
        return parse_port(value, source)
    for name in variables:
        if environ.get(name):
            return parse_port(environ[name], name)
    return DEFAULT_PORT


def parse_port(value: int | str, source: str) -> int:
    """A port number from ``source`` (a flag or variable name, for the message).

    Raises:
        BadRequestError: ``value`` is not a number in 1..65535.
    """
    try:
        port = int(value)
    except (TypeError, ValueError):
        port = 0
    if not 1 <= port <= 65535:
        raise BadRequestError(f"{source} must be a port number from 1 to 65535, not {value!r}.")
    return port


def _read_token_file(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuthError(f"Cannot read the token file {path} ({exc.strerror}). "
                        "Fix its permissions or set MYMPS_TOKEN.") from None
    return text or None
