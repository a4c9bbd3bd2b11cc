"""Whether a mymps server answers at the tunnel's local end, and the one-line status that says so.

`mymps tunnel --check` is all of it; the kept-up tunnel probes and reports through the same calls.
"""

from __future__ import annotations

from collections.abc import Mapping

from mymps_magic import errors
from mymps_magic.cli.tunnelsettings import LOCAL_HOST
from mymps_magic.client import Client

PROBE_TIMEOUT_S = 10.0


def say(message: str) -> None:
    """One status line on stdout, flushed at once: the tunnel runs for hours under a log."""
    print(f"mymps tunnel: {message}", flush=True)


def health(port: int) -> dict[str, object]:
    """``/health`` at the local end, within `PROBE_TIMEOUT_S`.

    Raises:
        MympsError: nothing answers there (a `TimeoutError` when the forward hangs).
    """
    with Client(LOCAL_HOST, port, timeout=PROBE_TIMEOUT_S) as client:
        return client.health()


def describe(health: Mapping[str, object]) -> str:
    """The server and its device in a few words, from a ``/health`` answer."""
    models = health.get("models") or []
    count = len(models) if isinstance(models, list) else 0
    return (f"mymps {health.get('version')} on {health.get('device')} ({health.get('device_name')}), "
            f"torch {health.get('torch')}, {count} model{'' if count == 1 else 's'} loaded")


def check(port: int) -> int:
    """`mymps tunnel --check`: is a mymps server reachable at the local end, with our token?

    Prints one line. Returns 0 when ``/health`` answers and the token is accepted, else 1.
    """
    address = f"{LOCAL_HOST}:{port}"
    try:
        with Client(LOCAL_HOST, port, timeout=PROBE_TIMEOUT_S) as client:
            answer = client.health()
            client.models()
    except errors.AuthError as exc:
        say(f"up at {address}; {exc}")
        return 1
    except errors.MympsError:
        say(f"down: nothing answers at {address}; start the tunnel with `mymps tunnel user@host`.")
        return 1
    say(f"up at {address}: {describe(answer)}.")
    return 0
