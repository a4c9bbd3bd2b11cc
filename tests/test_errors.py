"""The error tree: builtin bases for the usual `except` clauses, status mapping, remote tracebacks."""

from __future__ import annotations

import builtins
import pickle

import pytest

from mymps_magic import errors
from mymps_magic.errors import (
    AuthError,
    BadRequestError,
    ConnectionError,
    MympsError,
    NotFoundError,
    RemoteError,
    ServerError,
    TimeoutError,
    error_for_status,
)


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (ConnectionError, builtins.ConnectionError),
        (TimeoutError, builtins.TimeoutError),
        (NotFoundError, LookupError),
        (BadRequestError, ValueError),
    ],
)
def test_errors_are_also_the_builtin_of_their_kind(cls: type[MympsError], builtin: type[Exception]) -> None:
    err = cls("Cannot reach 127.0.0.1:5555.")
    assert isinstance(err, MympsError) and isinstance(err, builtin)
    assert str(err) == "Cannot reach 127.0.0.1:5555."


def test_every_error_is_a_mymps_error() -> None:
    for cls in (AuthError, ServerError, RemoteError):
        assert issubclass(cls, MympsError)


@pytest.mark.parametrize(
    ("status", "cls"),
    [(404, NotFoundError), (400, BadRequestError), (413, BadRequestError), (422, BadRequestError),
     (500, ServerError), (507, ServerError)],
)
def test_error_for_status_keeps_the_servers_message(status: int, cls: type[MympsError]) -> None:
    err = error_for_status(status, "model 'x' is not loaded (loaded: a, b)")
    assert type(err) is cls
    assert err.status_code == status
    assert str(err) == "model 'x' is not loaded (loaded: a, b)"


def test_remote_error_renders_the_remote_traceback() -> None:
    tb = ["Traceback (most recent call last):\n", '  File "<cell>", line 1, in <module>\n', "ZeroDivisionError: division by zero\n"]
    err = RemoteError("ZeroDivisionError", "division by zero", tb)
    assert str(err) == "ZeroDivisionError: division by zero"
    assert err._render_traceback_() == [line.rstrip("\n") for line in tb]


def test_remote_error_without_traceback_renders_its_message() -> None:
    assert RemoteError("KeyError", "'x'")._render_traceback_() == ["KeyError: 'x'"]


def test_errors_survive_pickling() -> None:
    remote = pickle.loads(pickle.dumps(RemoteError("ValueError", "bad", ["line"])))
    assert (remote.ename, remote.evalue, remote.traceback) == ("ValueError", "bad", ["line"])
    server = pickle.loads(pickle.dumps(error_for_status(507, "out of memory")))
    assert type(server) is ServerError and server.status_code == 507


def test_the_cli_error_joins_the_tree_and_prints_one_line() -> None:
    assert issubclass(errors.CommandError, MympsError)
    assert errors.CommandError("no host given")._render_traceback_() == ["CommandError: no host given"]


def test_module_all_lists_the_tree() -> None:
    assert set(errors.__all__) >= {"MympsError", "ConnectionError", "TimeoutError", "AuthError",
                                   "NotFoundError", "BadRequestError", "ServerError", "RemoteError"}


def test_a_remote_error_named_after_its_type_pickles_and_its_path_exists() -> None:
    import mymps_magic.remote

    err = mymps_magic.remote._remote_error("KeyError", "'x'", ["Traceback\n", "KeyError: 'x'\n"])
    assert type(err) is mymps_magic.remote.KeyError and isinstance(err, RemoteError)
    assert str(err) == "'x'"  # the type says "KeyError" already
    assert "KeyError: 'x'" in str(err.__cause__)  # the remote traceback, printed before it outside IPython
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is type(err) and (again.ename, again.evalue, again.traceback) == (err.ename, err.evalue, err.traceback)
