"""The server's settings, read once at startup and passed down.

Every option is also an environment variable ``MYMPS_<OPTION>`` (SPEC 3); command-line flags
override the environment. Nothing else in the server reads ``os.environ``: a bad value fails here,
at startup, and names the variable or flag it came from.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mymps_magic.wire import DTYPES, KINDS, WireFormatError
from mymps_magic.wire.keepalive import FOREVER, parse_keep_alive

from .errors import SettingsError

DEVICES = ("auto", "mps", "cuda", "cpu")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB|K|M|G|T)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3, "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}


def parse_size(text: str, source: str = "size") -> int:
    """Parse ``4GiB``, ``512MiB``, ``1000`` (bytes) and the like.

    Raises:
        SettingsError: naming ``source`` when the text is not a size.
    """
    match = _SIZE.match(str(text))
    if not match:
        raise SettingsError(f"{source}: {text!r} is not a size; use e.g. 4GiB, 512MiB or a byte count")
    number, unit = match.groups()
    size = int(float(number) * _UNITS[(unit or "b").lower()])
    if size <= 0:
        raise SettingsError(f"{source}: the size must be positive, got {text!r}")
    return size


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _flag(env: Mapping[str, str], name: str) -> bool:
    value = env.get(name, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise SettingsError(f"{name}={value!r}: use 1 or 0")


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to start; immutable once built."""

    host: str = "127.0.0.1"
    port: int = 5555
    device: str = "auto"
    # A factory, so the default follows the HOME of the process that builds Settings, not of the import.
    home: Path = field(default_factory=lambda: Path("~/.mymps").expanduser())
    token_file: Path | None = None
    token: str | None = None
    allow_remote: bool = False
    max_body: int = 4 * 1024**3
    session_idle: float = 3600.0
    # What one session keeps for a client that has not acknowledged it (output past it is
    # dropped with a note): 256 MiB holds millions of printed lines and a few large results,
    # while a handful of stalled notebooks cannot exhaust the memory of the machine.
    session_buffer: int = 256 * 1024**2
    preload: tuple[tuple[str, str, str], ...] = ()
    restore: bool = False
    # Forever by default: a model someone loaded stays until they unload it, unless they (or the
    # server's operator) ask for a keep_alive, as Ollama users do.
    keep_alive: float = FOREVER
    memory_limit: int | None = None
    no_evict: bool = False

    @property
    def resolved_token_file(self) -> Path:
        return self.token_file or self.home / "token"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, flags: Mapping[str, object] | None = None) -> Settings:
        """Build settings from ``MYMPS_*`` variables (``MYMPS_BIND`` for the host) and flags.

        Args:
            env: the variables; ``os.environ`` by default.
            flags: command-line values by field name, already parsed; ``None`` means not given.
                A given flag wins over its variable, which is then not even read: a bad
                ``MYMPS_PORT`` does not stop ``--port 5555``, and ``MYMPS_BIND=0.0.0.0`` does not
                stop ``--host 127.0.0.1``. Checks run once, on the result, and name each value's
                source (the flag, else the variable).

        Raises:
            SettingsError: a value is malformed or not allowed.
        """
        env = os.environ if env is None else env
        given = {name: value for name, value in (flags or {}).items() if value is not None}
        unread = {env_name(name) for name in given}
        env = {key: value for key, value in env.items() if key not in unread}
        kwargs: dict[str, object] = {}
        if "MYMPS_BIND" in env:
            kwargs["host"] = env["MYMPS_BIND"]
        if "MYMPS_PORT" in env:
            kwargs["port"] = _port(env["MYMPS_PORT"], "MYMPS_PORT")
        if "MYMPS_DEVICE" in env:
            kwargs["device"] = env["MYMPS_DEVICE"]
        if env.get("MYMPS_HOME"):
            kwargs["home"] = Path(env["MYMPS_HOME"]).expanduser()
        if env.get("MYMPS_TOKEN_FILE"):
            kwargs["token_file"] = Path(env["MYMPS_TOKEN_FILE"]).expanduser()
        if env.get("MYMPS_TOKEN"):
            kwargs["token"] = env["MYMPS_TOKEN"]
        kwargs["allow_remote"] = _flag(env, "MYMPS_ALLOW_REMOTE")
        if "MYMPS_MAX_BODY" in env:
            kwargs["max_body"] = parse_size(env["MYMPS_MAX_BODY"], "MYMPS_MAX_BODY")
        if env.get("MYMPS_PRELOAD"):
            kwargs["preload"] = tuple(parse_preload(spec, "MYMPS_PRELOAD")
                                      for spec in env["MYMPS_PRELOAD"].split(",") if spec.strip())
        kwargs["restore"] = _flag(env, "MYMPS_RESTORE")
        if "MYMPS_SESSION_IDLE" in env:
            kwargs["session_idle"] = parse_seconds(env["MYMPS_SESSION_IDLE"], "MYMPS_SESSION_IDLE")
        if "MYMPS_SESSION_BUFFER" in env:
            kwargs["session_buffer"] = parse_size(env["MYMPS_SESSION_BUFFER"], "MYMPS_SESSION_BUFFER")
        if env.get("MYMPS_KEEP_ALIVE"):
            kwargs["keep_alive"] = keep_alive_setting(env["MYMPS_KEEP_ALIVE"], "MYMPS_KEEP_ALIVE")
        if env.get("MYMPS_MEMORY_LIMIT"):
            kwargs["memory_limit"] = parse_size(env["MYMPS_MEMORY_LIMIT"], "MYMPS_MEMORY_LIMIT")
        kwargs["no_evict"] = _flag(env, "MYMPS_NO_EVICT")
        kwargs.update(given)
        return cls(**kwargs).validated(set(given))  # type: ignore[arg-type]

    def validated(self, flags: set[str]) -> Settings:
        """Check the values together; ``flags`` are the fields that came from the command line."""
        def named(option: str) -> str:
            return f"--{option.replace('_', '-')}" if option in flags else env_name(option)

        if self.device not in DEVICES:
            raise SettingsError(f"{named('device')}: {self.device!r} is not one of {', '.join(DEVICES)}")
        if not 0 <= self.port < 65536:
            raise SettingsError(f"{named('port')}: {self.port} is not a TCP port (0-65535)")
        if not self.allow_remote and not is_loopback(self.host):
            raise SettingsError(
                f"refusing to bind {self.host} ({named('host')}): the server runs any code sent to it, so it "
                "listens on loopback only; reach it through `mymps tunnel`, "
                "or pass --allow-remote if you really mean it"
            )
        return self


def env_name(option: str) -> str:
    """The variable of a setting: ``MYMPS_<OPTION>``, except ``MYMPS_BIND`` for ``host``."""
    return "MYMPS_BIND" if option == "host" else f"MYMPS_{option.upper()}"


def parse_preload(spec: str, source: str) -> tuple[str, str, str]:
    """``NAME[:KIND[:DTYPE]]`` -> ``(name, kind, dtype)``; a name may itself contain colons.
    Without a kind, it is found from what the source holds (``detect``), as for a load request.

    Raises:
        SettingsError: naming ``source`` when the kind or dtype is unknown or the name is empty.
    """
    parts = spec.strip().split(":")
    kind, dtype = "detect", "auto"
    if len(parts) >= 3 and parts[-2] in KINDS:
        *name_parts, kind, dtype = parts
        if dtype not in DTYPES:
            raise SettingsError(f"{source}: {spec!r} has dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    elif len(parts) >= 2 and parts[-1] in KINDS:
        *name_parts, kind = parts
    elif len(parts) >= 2 and parts[-1] and parts[-1].isalpha():
        raise SettingsError(f"{source}: {spec!r} has kind {parts[-1]!r}; use one of {', '.join(KINDS)}")
    else:
        name_parts = parts
    name = ":".join(name_parts)
    if not name:
        raise SettingsError(f"{source}: {spec!r} names no model; use NAME[:KIND[:DTYPE]]")
    return name, kind, dtype


def parse_seconds(text: str, source: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise SettingsError(f"{source}: {text!r} is not a number of seconds")
    return value


def keep_alive_setting(text: str, source: str) -> float:
    """``--keep-alive`` / ``MYMPS_KEEP_ALIVE``: the requests' spellings (``5m``, ``-1``, ``300``).

    Raises:
        SettingsError: naming ``source`` and the spellings when the text is none of them.
    """
    try:
        return parse_keep_alive(text)
    except WireFormatError as exc:
        raise SettingsError(f"{source}: {exc}") from None


def _port(text: str, source: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SettingsError(f"{source}: {text!r} is not a port number") from None
