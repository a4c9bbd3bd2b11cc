"""mymps: a remote accelerator for a Jupyter notebook, reached through an SSH tunnel.

The client side. Importing it never imports torch, transformers or diffusers (nor IPython):
it must install and import in well under a second on a machine that has none of them.
"""

from __future__ import annotations

import importlib as _importlib
import importlib.metadata as _metadata
import typing as _typing

if _typing.TYPE_CHECKING:
    from mymps_magic._cellfuture import CellFuture as CellFuture
    from mymps_magic._futures import RemoteFuture as RemoteFuture
    from mymps_magic._original import MympsClient as MympsClient
    from mymps_magic._stream import TokenStream as TokenStream
    from mymps_magic.client import Client as Client
    from mymps_magic.display import RemoteValue as RemoteValue
    from mymps_magic.errors import AuthError as AuthError
    from mymps_magic.errors import BadRequestError as BadRequestError
    from mymps_magic.errors import CancelledError as CancelledError
    from mymps_magic.errors import ClosedError as ClosedError
    from mymps_magic.errors import ConnectionError as ConnectionError
    from mymps_magic.errors import MympsError as MympsError
    from mymps_magic.errors import NotFoundError as NotFoundError
    from mymps_magic.errors import PicklingError as PicklingError
    from mymps_magic.errors import RemoteError as RemoteError
    from mymps_magic.errors import RemoteNameError as RemoteNameError
    from mymps_magic.errors import ServerError as ServerError
    from mymps_magic.errors import ServerGoneError as ServerGoneError
    from mymps_magic.errors import SessionLostError as SessionLostError
    from mymps_magic.errors import TimeoutError as TimeoutError
    from mymps_magic.errors import VersionMismatchError as VersionMismatchError

# Where each public name lives, imported on first use (PEP 562): ``import mymps_magic.wire``, which
# the server does, must not bring the client's HTTP and WebSocket stack along.
_LAZY = {
    "CellFuture": "mymps_magic._cellfuture",
    "Client": "mymps_magic.client",
    "MympsClient": "mymps_magic._original",
    "RemoteFuture": "mymps_magic._futures",
    "RemoteValue": "mymps_magic.display",
    "TokenStream": "mymps_magic._stream",
    "AuthError": "mymps_magic.errors",
    "BadRequestError": "mymps_magic.errors",
    "CancelledError": "mymps_magic.errors",
    "ClosedError": "mymps_magic.errors",
    "ConnectionError": "mymps_magic.errors",
    "MympsError": "mymps_magic.errors",
    "NotFoundError": "mymps_magic.errors",
    "PicklingError": "mymps_magic.errors",
    "RemoteError": "mymps_magic.errors",
    "RemoteNameError": "mymps_magic.errors",
    "ServerError": "mymps_magic.errors",
    "ServerGoneError": "mymps_magic.errors",
    "SessionLostError": "mymps_magic.errors",
    "TimeoutError": "mymps_magic.errors",
    "VersionMismatchError": "mymps_magic.errors",
}


def __getattr__(name: str) -> _typing.Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'mymps_magic' has no attribute {name!r}")
    value = getattr(_importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


try:
    __version__ = _metadata.version("mymps")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.1.0"

def load_ipython_extension(ipython: object) -> None:
    """``%load_ext mymps_magic``: register ``%mymps`` and ``%%mymps``."""
    from mymps_magic.magics import MympsMagics

    ipython.register_magics(MympsMagics)  # type: ignore[attr-defined]


def notebook_client() -> Client:
    """The `Client` behind ``%mymps`` in this notebook: ``c = notebook_client()`` shares the
    ``%%mymps`` cells' session and namespace (``c.pull("x")`` sees what a cell defined)."""
    from mymps_magic.magics import notebook_client as current

    return current()


__all__ = [
    "AuthError",
    "BadRequestError",
    "CancelledError",
    "CellFuture",
    "Client",
    "ClosedError",
    "ConnectionError",
    "MympsClient",
    "MympsError",
    "NotFoundError",
    "PicklingError",
    "RemoteError",
    "RemoteFuture",
    "RemoteNameError",
    "RemoteValue",
    "ServerError",
    "ServerGoneError",
    "SessionLostError",
    "TimeoutError",
    "TokenStream",
    "VersionMismatchError",
    "__version__",
    "load_ipython_extension",
    "notebook_client",
]
