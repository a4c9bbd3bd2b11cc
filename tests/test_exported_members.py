"""Guards the public API: what `mymps_magic.__all__` lists is the contract; the rest may change."""

from __future__ import annotations

import __future__
from types import ModuleType

import mymps_magic

PUBLIC_API = [
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


def test_all_is_exactly_the_public_api() -> None:
    assert mymps_magic.__all__ == PUBLIC_API


def test_every_exported_name_exists() -> None:
    for name in mymps_magic.__all__:
        assert hasattr(mymps_magic, name), name


def test_no_public_name_is_left_out_of_all() -> None:
    public = {
        name
        for name, value in vars(mymps_magic).items()
        if not name.startswith("_") and not isinstance(value, (ModuleType, __future__._Feature))
    }
    assert public <= set(mymps_magic.__all__)


def test_mympsclient_is_a_client_with_the_originals_signatures() -> None:
    import inspect

    assert issubclass(mymps_magic.MympsClient, mymps_magic.Client)
    assert list(inspect.signature(mymps_magic.MympsClient).parameters)[:3] == ["host", "port", "timeout"]


def test_version_is_a_string() -> None:
    assert isinstance(mymps_magic.__version__, str) and mymps_magic.__version__


SERVER_API = ["Settings", "create_app"]


def test_the_servers_all_is_exactly_its_public_api() -> None:
    import kernel_server

    assert kernel_server.__all__ == SERVER_API
    for name in kernel_server.__all__:
        assert getattr(kernel_server, name) is not None, name
    public = {
        name
        for name, value in vars(kernel_server).items()
        if not name.startswith("_") and not isinstance(value, (ModuleType, __future__._Feature))
    }
    assert public <= set(kernel_server.__all__), public - set(kernel_server.__all__)
