"""Remote execution on the `Client`: run, submit, @remote, push, pull, run_cell, interrupt, reset.

All of it travels over the session channel (``/ws/session``), opened on first use. The session's
namespace lives on the server and survives reconnects; ``reset`` clears it, never the models.
"""

from __future__ import annotations

import functools
import itertools
import sys
import sysconfig
import threading
from pathlib import Path
from types import FunctionType, ModuleType
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from mymps_magic import errors, wire
from mymps_magic._pickling import PickledFunctions, filled
from mymps_magic._outcomes import RemoteFuture
from mymps_magic._session import SessionChannel
from mymps_magic.display import OutputSink, RemoteValue

if TYPE_CHECKING:
    from mymps_magic._connection import Connection

F = TypeVar("F", bound=Callable[..., Any])

_FUNCTIONS = PickledFunctions()

_INSTALLED = tuple(
    str(Path(p).resolve()) for key in ("stdlib", "platstdlib", "purelib", "platlib")
    if (p := sysconfig.get_paths().get(key))
)


class RemoteExecution:
    """The remote-execution half of `Client` (mixed in; see `Client` for the connection)."""

    _connection: Connection

    def __init__(self) -> None:
        # Per instance: one lock shared by the class would make every Client in the process
        # wait on another's connect.
        self._channel: SessionChannel | None = None
        self._channel_lock = threading.Lock()

    @property
    def session(self) -> SessionChannel:
        """The session channel, connected on first use (once, however many threads ask)."""
        channel = self._channel
        if channel is None:
            with self._channel_lock:
                if self._channel is None:
                    self._channel = SessionChannel(self._connection, OutputSink())
                channel = self._channel
        return channel

    def _close_session(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def _pickled_call(self, fn: Callable[..., Any], args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        """The fields and buffers of a ``run`` request: the function's own pickle stream, reused
        while valid, and the arguments' buffers; or, for a function that cannot be kept, all
        three pickled together."""
        channel = self.session
        if channel.mismatch:
            raise errors.VersionMismatchError(channel.mismatch)
        try:
            pickled = _FUNCTIONS.lookup(fn)
            if pickled is None:
                _send_local_modules_by_value(fn)
                pickled = _FUNCTIONS.fill(fn)
            if args or kwargs:
                _send_local_modules_by_value(*args, *kwargs.values())
            if pickled is not None:
                return {"fn": pickled}, wire.dumps((args, kwargs))
            return {}, wire.dumps((fn, args, kwargs))
        except Exception as exc:
            raise errors.PicklingError(
                f"Cannot send {getattr(fn, '__name__', fn)!r} or its arguments: {type(exc).__name__}: {exc}. "
                "Send plain data (numbers, lists, arrays, tensors) or write the code in a %%mymps cell"
            ) from None

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on the server and return its value.

        Printed output and ``display(...)`` calls show here while it runs. Ctrl-C (the
        notebook's stop button) raises ``KeyboardInterrupt`` in the remote code.

        Raises:
            RemoteError: ``fn`` raised on the server (remote type, message and traceback).
            PicklingError: ``fn``, an argument or the return value cannot be pickled.
            VersionMismatchError: the two ends run different Python or cloudpickle versions.
        """
        fields, buffers = self._pickled_call(fn, args, kwargs)
        return self.session.call("run", fields, buffers, source=fn)

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> RemoteFuture:
        """Queue ``fn(*args, **kwargs)`` on the server and return at once.

        Returns:
            A ``concurrent.futures.Future``: ``result(timeout)``, ``done()``, ``cancel()``
            (True only while it is still queued; a running call is stopped with `interrupt`).
            Its ``job_id`` is the id ``/jobs`` shows once it runs.
        """
        fields, buffers = self._pickled_call(fn, args, kwargs)
        return self.session.request("run", {**fields, "notify_start": True}, buffers, waiter=False, source=fn).future

    def remote(self, fn: F) -> F:
        """Decorator: calling the function runs it on the server (``run``), with the same args."""

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            return self.run(fn, *args, **kwargs)

        return call  # type: ignore[return-value]

    def push(self, **values: Any) -> None:
        """Set names in the remote namespace: ``c.push(x=arr, y=2)``.

        Raises:
            PicklingError: a value cannot be pickled.
        """
        _send_local_modules_by_value(*values.values())
        try:
            buffers = wire.dumps(values)
        except Exception as exc:
            bad = [name for name, v in values.items() if not _picklable(v)]
            raise errors.PicklingError(
                f"Cannot push {', '.join(map(repr, bad)) or 'the values'}: {type(exc).__name__}: {exc}. "
                "Push plain data (numbers, lists, arrays, tensors) or build the object remotely in a %%mymps cell"
            ) from None
        self.session.call("push", buffers=buffers)

    def pull(self, *names: str) -> Any:
        """Get values from the remote namespace: one name returns the value, several a tuple.

        Raises:
            RemoteNameError: a name is not defined remotely.
            PicklingError: a value cannot be pickled (keep it remote; pull plain data).
        """
        if not names:
            raise errors.BadRequestError("pull needs at least one name, e.g. c.pull('x')")
        values = self.session.call("pull", {"names": list(names)})
        return values[0] if len(names) == 1 else values

    def run_cell(self, source: str, *, timeout: float | None = None) -> Any:
        """Run Python source in the remote namespace, as a notebook cell runs.

        Output shows while it runs; the value of the last expression is returned (a
        `RemoteValue`, which shows the remote rich repr, if the value itself cannot be pickled).

        Args:
            source: the cell's code.
            timeout: seconds after which the remote code is interrupted.

        Raises:
            RemoteError: the cell raised (``KeyboardInterrupt`` after an interrupt or timeout).
        """
        result = self.run_cell_rich(source, timeout=timeout)
        return result.value if result is not None and result.arrived else result

    def run_cell_rich(self, source: str, *, timeout: float | None = None) -> RemoteValue | None:
        """Run a cell as `run_cell` does, but keep the rich repr the server made of its value.

        This is what ``%%mymps`` shows: the notebook displays the returned object through the
        server's mimebundle (an image, a table), whether or not the value could come back.

        Args:
            source: the cell's code.
            timeout: seconds after which the remote code is interrupted.

        Returns:
            The last expression's `RemoteValue`; None when the cell ends without a value.

        Raises:
            RemoteError: the cell raised (``KeyboardInterrupt`` after an interrupt or timeout).
        """
        result = self.session.call("cell", {"source": source}, timeout=timeout)
        return result if isinstance(result, RemoteValue) else None

    def interrupt(self) -> None:
        """Raise ``KeyboardInterrupt`` in this session's running remote code (if any)."""
        self.session.interrupt()

    def reset(self) -> None:
        """Clear the remote namespace. The loaded models stay loaded.

        After a `SessionLostError` (the server restarted, or crashed: `ServerGoneError`) every
        session call raises it again until this is called: then calls go on in a fresh session.
        """
        self.session.acknowledge_loss()
        self.session.call("reset")


def _picklable(value: Any) -> bool:
    try:
        wire.dumps(value)
    except Exception:
        return False
    return True


def _is_local(module: ModuleType | None) -> bool:
    """A module of the user's own (not installed, not the standard library), which the server
    cannot be expected to import: it must travel by value."""
    if module is None or module.__name__ in ("__main__", "builtins") or module.__name__.startswith("mymps_magic"):
        return False
    file = getattr(module, "__file__", None)
    if not file:
        return False
    return not str(Path(file).resolve()).startswith(_INSTALLED)


_SCAN_LIMIT = 1000
"""Items of a container looked at for local classes: enough for real data, bounded for huge lists."""


def _send_local_modules_by_value(*objs: Any) -> None:
    """Register the user's own modules that these objects (and the functions they call) come from
    with cloudpickle's pickle-by-value, so the server needs no copy of them."""
    import cloudpickle

    seen: set[int] = set()
    todo = list(objs)
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        module = obj if isinstance(obj, ModuleType) else sys.modules.get(getattr(obj, "__module__", None) or "")
        if module is None and not isinstance(obj, FunctionType):
            module = sys.modules.get(type(obj).__module__)
        if _is_local(module):
            assert module is not None
            top = sys.modules.get(module.__name__.split(".")[0], module)
            try:
                cloudpickle.register_pickle_by_value(top)
            except ValueError:
                cloudpickle.register_pickle_by_value(module)
        if isinstance(obj, FunctionType):
            # The names of nested code too (comprehensions, lambdas, inner functions): the same
            # walk that the pickle cache and the traceback sources use.
            names = wire.global_names(obj.__code__)
            todo.extend(obj.__globals__[n] for n in names if n in obj.__globals__)
            todo.extend(cell.cell_contents for cell in obj.__closure__ or () if filled(cell))
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo.extend(itertools.islice(obj, _SCAN_LIMIT))  # instances of local classes inside
        elif isinstance(obj, dict):
            todo.extend(itertools.islice(obj.values(), _SCAN_LIMIT))
