"""Running the user's functions and cells: unpickling, the namespace, and the frame that ends it.

A ``run`` or ``cell`` request runs here, on the device worker (see ``jobs.py``), inside the
output capture of :mod:`.capture`; its value or error becomes the request's last frame.
The session (``sessions.py``) only decides when it runs.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import IPython
from IPython.core.error import UsageError

from mymps_magic import wire

from .capture import Execution, Outlet, progress
from .errors import is_out_of_memory
from .shell import shell_of

if TYPE_CHECKING:
    from .device import Device
    from .jobs import Job

_SERVER_DIR = str(Path(__file__).resolve().parent)
_WIRE_DIR = str(Path(wire.__file__).resolve().parent)
_IPYTHON_DIR = str(Path(IPython.__file__).resolve().parent)  # the shell's frames around a cell's code


def run_request(job: Job, frame: wire.Frame, namespace: dict[str, Any], execution: Execution, outlet: Outlet,
                device: Device, client_torch: bool) -> wire.Frame:
    """Run a ``run`` or ``cell`` request in ``namespace``, its output going to ``outlet``;
    returns its final frame (never raises: a failure is an ``error`` frame). A cell runs in the
    namespace's IPython shell (:mod:`.shell`); ``client_torch`` (the client has torch, its hello
    said) makes a tensor value plain data, sent back (:func:`cell_value_frame`)."""
    rid = frame.id
    try:
        if frame.type == "run":
            try:
                if "fn" in frame.fields:  # the function's own stream, apart from its arguments
                    fn = wire.loads([frame["fn"]])
                    args, kwargs = wire.loads(frame.buffers)
                else:
                    fn, args, kwargs = wire.loads(frame.buffers)
            except Exception as exc:
                return error_frame(rid, unpickle_error(exc), wire.ERROR_PICKLE)
            see_namespace(fn, namespace)
            with execution.capture(outlet), job.user_code():
                value = fn(*args, **kwargs)
            return value_frame(rid, value)
        shell = shell_of(namespace, PREDEFINED)
        with execution.capture(outlet), job.user_code():
            value, mime, handle = shell.run(wire.read_source(frame))
        return cell_value_frame(rid, value, mime, handle, client_torch)
    except BaseException as exc:
        if job.cancelled_flag:  # stopped by a cancel or the shutdown, not by the user's code
            failed = error_frame(rid, RuntimeError(f"the call was {job.cancel_reason}"), wire.ERROR_CANCELLED)
        else:
            failed = error_frame(rid, exc)
        # The frames' locals go now: IPython's own frames refer to the error (a cycle), which
        # would keep the failing code's tensors until the cyclic collector runs, and an
        # out-of-memory error could not free them below.
        traceback.clear_frames(exc.__traceback__)
        if is_out_of_memory(exc) and not job.cancelled_flag:
            device.free_memory()
        return failed


class ModelsView(Mapping[str, Any]):
    """``models`` in the namespace: name -> the loaded model or pipeline object, always current."""

    def __init__(self, registry: Any) -> None:
        self._registry = registry

    def __getitem__(self, name: str) -> Any:
        return self._registry.get(name).obj

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry.names())

    def __len__(self) -> int:
        return len(self._registry.names())

    def __repr__(self) -> str:
        return f"models({', '.join(self._registry.names()) or 'none loaded'})"


PREDEFINED = ("DEVICE", "models", "tokenizers", "torch", "np", "display", "progress")
"""The names SPEC 5 promises remote code (`new_namespace`, and the session's ``tokenizers``)."""


def new_namespace(device: Any, registry: Any, execution: Execution) -> dict[str, Any]:
    """A fresh session namespace with what SPEC 5 promises remote code."""
    import numpy as np
    import torch

    def display(*objs: Any) -> None:
        """Show objects in the notebook (images, figures, HTML, anything with a rich repr)."""
        outlet = execution.current
        if outlet is None:
            print(*objs)
        else:
            outlet.display(*objs)

    return {
        "__name__": "__mymps__",
        "__builtins__": __builtins__,
        "DEVICE": device.torch_device,
        "models": ModelsView(registry),
        "torch": torch,
        "np": np,
        "display": display,
        "progress": progress,
    }


def remote_traceback(exc: BaseException) -> list[str]:
    """The traceback the user should see: their frames, without the server's own."""
    if isinstance(exc, UsageError) or (
            isinstance(exc, SyntaxError) and exc.filename and exc.filename.startswith("<mymps-cell-")):
        return traceback.format_exception_only(type(exc), exc)  # one line, or the cell's line and caret
    tb: TracebackType | None = exc.__traceback__
    while tb is not None and _is_server_frame(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    lines = traceback.format_exception(type(exc), exc, tb)
    return [line for line in lines if not any(_is_server_frame(part) for part in _files_in(line))]


def _files_in(line: str) -> list[str]:
    if line.lstrip().startswith('File "'):
        return [line.split('"')[1]]
    return []


def _is_server_frame(filename: str) -> bool:
    return filename.startswith((_SERVER_DIR, _WIRE_DIR, _IPYTHON_DIR))


def error_frame(request_id: int, exc: BaseException, code: str = wire.ERROR_REMOTE) -> wire.Frame:
    """The ``error`` frame for ``exc``; only the user's own errors carry their traceback."""
    traceback = remote_traceback(exc) if code == wire.ERROR_REMOTE else []
    return wire.error(request_id, type(exc).__name__, str(exc), traceback, code)


def see_namespace(fn: Any, namespace: dict[str, Any]) -> None:
    """Let a function sent by value see the session namespace (``DEVICE``, ``models``, pushed
    variables...) for the names it does not define itself, as a cell would.

    Only functions whose globals cloudpickle rebuilt are touched; a function pickled by
    reference (``np.linalg.svd``) keeps its module's globals untouched.
    """
    globals_ = getattr(fn, "__globals__", None)
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    if globals_ is None or (module is not None and globals_ is vars(module)):
        return
    for name in wire.global_names(fn.__code__):  # only what the code can ask for: cheap in a big namespace
        if name not in globals_ and name in namespace:
            globals_[name] = namespace[name]


def unpickle_error(exc: BaseException) -> Exception:
    hint = ""
    if isinstance(exc, ModuleNotFoundError):
        hint = (f"; the server cannot import {exc.name!r}: install it there, or define the code in the "
                "notebook or your own module so it travels by value")
    return RuntimeError(f"the server could not unpickle what was sent ({type(exc).__name__}: {exc}){hint}")


def value_frame(rid: int, value: Any, names: list[str] | None = None) -> wire.Frame:
    """The result frame of a ``run`` (its value) or a ``pull`` of ``names`` (their values): pickled."""
    try:
        buffers = wire.dumps(value)
    except Exception as exc:
        what = f"the {type(value).__name__} value"
        if names:
            what = f"{names[0]!r}" if len(names) == 1 else "one of " + ", ".join(map(repr, names))
        return error_frame(rid, TypeError(
            f"cannot send {what} back: it cannot be pickled ({type(exc).__name__}: {exc}). Keep it remote in "
            "a variable and pull plain data (numbers, lists, arrays, tensors) instead"), wire.ERROR_PICKLE)
    return wire.result(rid, buffers)


def cell_value_frame(rid: int, value: Any, mime: dict[str, Any] | None, handle: str, client_torch: bool
                     ) -> wire.Frame:
    """The result frame of a cell: its value's mimebundle always, the value itself only when it
    is plain data (:func:`is_plain`). Anything else (a model, ``DEVICE``, a tokenizer) stays on
    the server under ``handle``: moving it is the user's explicit choice (``pull``, ``fetch()``),
    never a side effect of showing it."""
    if mime is None:
        return wire.result(rid, wire.dumps(None))
    if not is_plain(value, client_torch):
        return wire.kept(rid, mime, handle, f"a {type(value).__name__} stays on the server")
    try:
        buffers = wire.dumps(value)
    except Exception as exc:
        return wire.kept(rid, mime, handle, f"{type(value).__name__}: {exc}")
    return wire.result(rid, buffers, mime, handle)


_SCALARS = (type(None), bool, int, float, complex, str, bytes)
_MAX_PLAIN_ITEMS = 100_000
"""Past this many items, a container is not walked further: it stays on the server."""


def is_plain(value: Any, client_torch: bool) -> bool:
    """Whether a cell's value is data the client can hold: numbers, strings, bytes, None,
    lists, tuples, sets and dicts of them, numpy arrays (not of objects), and tensors when the
    client has torch (a tensor is a numpy array there only through an explicit pull)."""
    np = sys.modules.get("numpy")
    torch = sys.modules.get("torch") if client_torch else None
    stack, seen = [value], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > _MAX_PLAIN_ITEMS:
            return False
        kind = type(item)
        if kind in _SCALARS:
            continue
        if kind in (list, tuple, set, frozenset):
            stack.extend(item)
        elif kind is dict:
            stack.extend(item.keys())
            stack.extend(item.values())
        elif not _is_array(item, np, torch):
            return False
    return True


def _is_array(item: Any, np: Any, torch: Any) -> bool:
    """A numpy scalar or array (not of objects), or a tensor where ``torch`` is given."""
    if np is not None and (isinstance(item, np.generic) or (isinstance(item, np.ndarray) and item.dtype != object)):
        return True
    return torch is not None and isinstance(item, torch.Tensor)


def versions_mismatch(python: str, cloudpickle: str) -> str | None:
    """The one line a user reads when the two ends cannot exchange pickled code, or None."""
    here_python, here_cp = wire.PYTHON_VERSION, wire.cloudpickle_version()
    if python == here_python and cloudpickle == here_cp:
        return None
    return (f"Python {python} / cloudpickle {cloudpickle} here, Python {here_python} / cloudpickle {here_cp} "
            "on the server: pickled code (run, submit, @remote) is refused; cells and plain data still work. "
            f"Use Python {here_python} and `pip install cloudpickle=={here_cp}` on the notebook side")
