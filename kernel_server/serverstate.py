"""What the endpoints share: `ServerState` on ``app.state.mymps``, and the server's version.

Its own module so that ``routes`` and ``sessions`` can name them without importing ``app``,
which imports both of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING

from .lifetime import Lifetime

if TYPE_CHECKING:
    from .device import Device
    from .jobs import JobQueue
    from .registry import Registry
    from .sessions import SessionManager
    from .settings import Settings


def server_version() -> str:
    """The installed ``mymps`` version; a source tree that was never installed says so."""
    try:
        return metadata.version("mymps")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass
class ServerState:
    """What the endpoints share; lives on ``app.state.mymps`` for the app's lifetime.

    Building it starts the models' `Lifetime` (it attaches itself to the registry), so that
    every app gets expiry and eviction without its lifespan naming them.
    """

    settings: Settings
    device: Device
    registry: Registry
    jobs: JobQueue
    sessions: SessionManager
    started_at: float = field(default_factory=time.time)
    lifetime: Lifetime = field(init=False)

    def __post_init__(self) -> None:
        self.lifetime = Lifetime(self.settings, self.registry, self.jobs)
