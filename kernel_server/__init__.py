"""The accelerator side of mymps: keeps models in device memory and runs work on them.

Start it with ``python -m kernel_server`` or ``mymps serve``; embed it with :func:`create_app`.
"""

from __future__ import annotations

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "create_app"]
