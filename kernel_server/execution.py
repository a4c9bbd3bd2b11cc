"""Running the user's functions and cells: unpickling, the namespace, and the frame that ends it.

A ``run`` or ``cell`` request runs here, on the device worker (see ``jobs.py``), inside the
output capture of :mod:`.capture`; its value or error becomes the request's last frame.
The session (``sessions.py``) only decides when it runs.
"""

from __future__ import annotations

import ast
import io
import itertools
import linecache
import sys
import tokenize
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import CodeType, TracebackType
from typing import TYPE_CHECKING, Any

from mymps_magic import wire

from .capture import Execution, Outlet, progress
from .errors import is_out_of_memory
from .richrepr import mimebundle

if TYPE_CHECKING:
    from .device import Device
    from .jobs import Job

_SERVER_DIR = str(Path(__file__).resolve().parent)
_WIRE_DIR = str(Path(wire.__file__).resolve().parent)


def run_request(job: Job, frame: wire.Frame, namespace: dict[str, Any], execution: Execution, outlet: Outlet,
                device: Device) -> wire.Frame:
    """Run a ``run`` or ``cell`` request in ``namespace``, its output going to ``outlet``;
    returns its final frame (never raises: a failure is an ``error`` frame)."""
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
            return value_frame(rid, value, None)
        body, last = compile_cell(wire.read_source(frame))
        with execution.capture(outlet), job.user_code():
            exec(body, namespace)
            value = eval(last, namespace) if last is not None else None
        if value is not None:
            namespace["_"] = value
        return value_frame(rid, value, outlet)
    except BaseException as exc:
        if job.cancelled_flag:  # stopped by a cancel or the shutdown, not by the user's code
            return error_frame(rid, RuntimeError(f"the call was {job.cancel_reason}"), wire.ERROR_CANCELLED)
        if is_out_of_memory(exc):
            device.free_memory()
        return error_frame(rid, exc)


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


_cell_numbers = itertools.count(1)


def compile_cell(source: str) -> tuple[CodeType, CodeType | None]:
    """Compile a cell as IPython does: the last statement, if an expression, gives its value.

    The source is registered with ``linecache`` so tracebacks show the cell's lines.
    """
    filename = f"<mymps-cell-{next(_cell_numbers)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    tree = ast.parse(source, filename=filename, mode="exec")
    last = None
    final = tree.body[-1] if tree.body else None
    if isinstance(final, ast.Expr) and not _ends_with_semicolon(source):
        tree.body.pop()
        last = ast.Expression(final.value)
    body = compile(tree, filename, "exec")
    return body, (compile(last, filename, "eval") if last is not None else None)


def _ends_with_semicolon(source: str) -> bool:
    """IPython's rule: a cell whose last token is ``;`` shows no value."""
    significant = [tok for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                   if tok.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.COMMENT, tokenize.ENDMARKER,
                                       tokenize.DEDENT, tokenize.INDENT)]
    return bool(significant) and significant[-1].string == ";"


def remote_traceback(exc: BaseException) -> list[str]:
    """The traceback the user should see: their frames, without the server's own."""
    if isinstance(exc, SyntaxError) and exc.filename and exc.filename.startswith("<mymps-cell-"):
        return traceback.format_exception_only(type(exc), exc)  # the cell's line and caret, no parser frames
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
    return filename.startswith((_SERVER_DIR, _WIRE_DIR))


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


def value_frame(rid: int, value: Any, outlet: Outlet | None, names: list[str] | None = None) -> wire.Frame:
    """The result frame for ``value``: pickled, plus its rich repr for a cell's last value."""
    mime = mimebundle(value)[0] if outlet is not None and value is not None else None
    try:
        buffers = wire.dumps(value)
    except Exception as exc:
        if outlet is not None:  # a cell's value still shows through its repr
            return wire.unpicklable(rid, f"{type(value).__name__}: {exc}", mime)
        what = f"{names[0]!r}" if names and len(names) == 1 else f"the {type(value).__name__} value"
        if names and len(names) > 1:
            what = "one of " + ", ".join(map(repr, names))
        return error_frame(rid, TypeError(
            f"cannot send {what} back: it cannot be pickled ({type(exc).__name__}: {exc}). Keep it remote in "
            "a variable and pull plain data (numbers, lists, arrays, tensors) instead"), wire.ERROR_PICKLE)
    return wire.result(rid, buffers, mime)


def versions_mismatch(python: str, cloudpickle: str) -> str | None:
    """The one line a user reads when the two ends cannot exchange pickled code, or None."""
    here_python, here_cp = wire.PYTHON_VERSION, wire.cloudpickle_version()
    if python == here_python and cloudpickle == here_cp:
        return None
    return (f"Python {python} / cloudpickle {cloudpickle} here, Python {here_python} / cloudpickle {here_cp} "
            "on the server: pickled code (run, submit, @remote) is refused; cells and plain data still work. "
            f"Use Python {here_python} and `pip install cloudpickle=={here_cp}` on the notebook side")
