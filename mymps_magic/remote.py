"""The classes of remote exceptions: ``mymps_magic.remote.ZeroDivisionError`` and the like.

A remote exception is raised here as a `RemoteError` subclass named after the remote type, so a
notebook (and nbclient, papermill, a plain script) reports ``ZeroDivisionError`` rather than
``RemoteError``. Each class is made on first use and kept: the path printed with it exists
(``mymps_magic.remote.KeyError`` is the very class raised), so ``except`` can name it too.
Every public name resolves (to such a class), as every type name may come from the server.

Every name of the module's own starts with ``_`` (hence no ``from __future__ import
annotations``, which would bind ``annotations``): a remote type's name never meets one of them.
"""

import functools as _functools

from mymps_magic import errors as _errors


# Bounded, as the names come from the server; far more remote types than any session raises.
@_functools.lru_cache(maxsize=4096)
def _class_for(ename: str) -> "type[_errors.RemoteError]":
    return type(ename, (_errors.RemoteError,), {"__module__": __name__, "__qualname__": ename})


def _remote_error(ename: str, evalue: str = "", traceback: "list[str] | None" = None) -> _errors.RemoteError:
    """The error for a remote exception (`RemoteError` itself for a type name that is not a
    plain identifier); also how a pickled `RemoteError` is rebuilt."""
    cls = _class_for(ename) if ename.isidentifier() and not ename.startswith("_") else _errors.RemoteError
    return cls(ename, evalue, traceback)


def __getattr__(name: str) -> "type[_errors.RemoteError]":
    if not name.isidentifier() or name.startswith("_"):
        raise AttributeError(name)
    return _class_for(name)
