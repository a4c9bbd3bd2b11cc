"""The accelerator side of mymps: keeps models in device memory and runs work on them.

Start it with ``python -m kernel_server`` or ``mymps serve``; embed it with :func:`create_app`.
``create_app`` is imported on first use: it brings torch and FastAPI, which ``mymps serve --help``
and a bad option should not wait for.
"""

from __future__ import annotations

import typing as _typing

from .settings import Settings

__all__ = ["Settings", "create_app"]


def __getattr__(name: str) -> _typing.Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'kernel_server' has no attribute {name!r}")
