"""Running the user's functions and cells: namespace, live output, displays, progress, errors.

User code runs on the device worker (see ``jobs.py``). While it runs, what it prints, displays
and reports as progress goes to an :class:`Outlet`, which sends it to the session as frames
straight away; nothing waits for the code to finish.
"""

from __future__ import annotations

import ast
import io
import itertools
import linecache
import sys
import threading
import tokenize
import traceback
from pathlib import Path
from types import CodeType, TracebackType
from typing import Any, Callable, Iterator, Mapping, TextIO

from mymps_magic import wire

from .richrepr import mimebundle

Emit = Callable[[wire.Frame], None]
"""Sends a frame to the session; safe to call from any thread."""

_SERVER_DIR = str(Path(__file__).resolve().parent)
_WIRE_DIR = str(Path(wire.__file__).resolve().parent)


class Outlet:
    """Where one request's output goes: stream text, displays and progress bars as frames."""

    def __init__(self, emit: Emit, request_id: int) -> None:
        self.emit = emit
        self.request_id = request_id
        self._bars = itertools.count(1)
        self._partial: dict[str, str] = {}  # per stream, text written after its last newline

    def stream(self, name: str, text: str) -> None:
        """Send whole lines at once; the rest of a line waits for its newline, a flush, or the
        next display or progress, as on a line-buffered terminal. So ``print``'s text and the
        newline it writes apart travel (and show in the notebook) as one piece."""
        text = self._partial.pop(name, "") + text
        cut = text.rfind("\n") + 1
        if cut < len(text):
            self._partial[name] = text[cut:]
        if cut:
            self.emit(wire.Frame("stream", self.request_id, {"name": name, "text": text[:cut]}))

    def flush(self, name: str | None = None) -> None:
        """Send what waits for a newline (of one stream, or of both)."""
        for key in [name] if name is not None else list(self._partial):
            text = self._partial.pop(key, "")
            if text:
                self.emit(wire.Frame("stream", self.request_id, {"name": key, "text": text}))

    def display(self, *objs: Any) -> None:
        self.flush()
        for obj in objs:
            data, metadata = mimebundle(obj)
            self.emit(wire.Frame("display", self.request_id, {"data": data, "metadata": metadata}))

    def new_bar(self) -> int:
        return next(self._bars)

    def progress(self, bar: int, fields: dict[str, Any]) -> None:
        self.flush()
        self.emit(wire.Frame("progress", self.request_id, {"bar": bar, **fields}))


class OutputRouter(io.TextIOBase):
    """Installed once as ``sys.stdout`` / ``sys.stderr``: text written while user code runs goes
    to that request's outlet (from any thread the code started), the rest to the real stream."""

    def __init__(self, name: str, real: TextIO) -> None:
        self.name = name
        self.real = real
        self.outlet: Outlet | None = None

    def write(self, text: str) -> int:
        outlet = self.outlet
        if outlet is None:
            return self.real.write(text)
        outlet.stream(self.name, text)
        return len(text)

    def flush(self) -> None:
        outlet = self.outlet
        if outlet is None:
            self.real.flush()
        else:
            outlet.flush(self.name)

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def fileno(self) -> int:
        return self.real.fileno()


class Execution:
    """The server's side of running user code: the output routers and the tqdm hook.

    Both are process-wide (``sys.stdout`` and the ``tqdm`` class are), so they are installed
    once per process, by the first open Execution, and shared by every Execution open at the
    same time (two apps built in one process); the last one to close puts the originals back.
    Installing them per Execution instead made a second app's hook wrap the first's, whose
    leftover ``__init__`` then overwrote the bar's outlet: a second app lost its progress bars.
    """

    _open = 0
    _lock = threading.Lock()
    _stdout: OutputRouter
    _stderr: OutputRouter
    _unhook_tqdm: Callable[[], None]

    def __init__(self) -> None:
        cls = Execution
        with cls._lock:
            if cls._open == 0:
                cls._stdout = OutputRouter("stdout", sys.stdout)
                cls._stderr = OutputRouter("stderr", sys.stderr)
                sys.stdout, sys.stderr = cls._stdout, cls._stderr  # type: ignore[assignment]
                cls._unhook_tqdm = _hook_tqdm()
            cls._open += 1
        self.stdout, self.stderr = cls._stdout, cls._stderr
        self._closed = False

    @property
    def current(self) -> Outlet | None:
        """The outlet of the user code running now, if any."""
        return self.stdout.outlet

    def close(self) -> None:
        cls = Execution
        with cls._lock:
            if self._closed:
                return
            self._closed = True
            cls._open -= 1
            if cls._open == 0:
                sys.stdout, sys.stderr = self.stdout.real, self.stderr.real
                cls._unhook_tqdm()

    def capture(self, outlet: Outlet) -> _Capture:
        return _Capture(self, outlet)


class _Capture:
    def __init__(self, execution: Execution, outlet: Outlet) -> None:
        self.execution = execution
        self.outlet = outlet

    def __enter__(self) -> Outlet:
        ex = self.execution
        ex.stdout.outlet = ex.stderr.outlet = self.outlet
        return self.outlet

    def __exit__(self, *exc: object) -> None:
        ex = self.execution
        ex.stdout.outlet = ex.stderr.outlet = None
        self.outlet.flush()  # a last line without its newline, before the result


def _hook_tqdm() -> Callable[[], None]:
    """Make tqdm bars of remote code report to the client instead of drawing on stderr.

    tqdm calls ``display`` whenever a bar should redraw (already rate-limited by its own
    ``mininterval``) and ``close`` at the end; both are rerouted while user code runs.

    Returns:
        A function that puts tqdm's own methods back.
    """
    from tqdm import std

    original_init, original_display, original_close = std.tqdm.__init__, std.tqdm.display, std.tqdm.close

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        outlet = Execution._stdout.outlet  # the routers are shared: the code running now
        self._mymps_outlet = outlet
        if outlet is not None:
            self._mymps_bar = outlet.new_bar()
            kwargs["file"] = io.StringIO()  # nothing to draw here: the client draws
        original_init(self, *args, **kwargs)

    def fields(self: Any, closed: bool) -> dict[str, Any]:
        d = self.format_dict
        return {"n": d.get("n", 0), "total": d.get("total"), "desc": d.get("prefix") or "",
                "unit": d.get("unit", "it"), "elapsed": round(d.get("elapsed", 0.0), 3), "closed": closed}

    def display(self: Any, msg: str | None = None, pos: int | None = None) -> Any:
        outlet = getattr(self, "_mymps_outlet", None)
        if outlet is None:
            return original_display(self, msg, pos)
        outlet.progress(self._mymps_bar, fields(self, False))
        return True

    def close(self: Any) -> None:
        outlet = getattr(self, "_mymps_outlet", None)
        done = getattr(self, "disable", True)
        original_close(self)
        if outlet is not None and not done:
            outlet.progress(self._mymps_bar, fields(self, True))

    def unhook() -> None:
        std.tqdm.__init__, std.tqdm.display, std.tqdm.close = original_init, original_display, original_close

    std.tqdm.__init__, std.tqdm.display, std.tqdm.close = __init__, display, close
    return unhook


def progress(iterable: Any = None, total: int | None = None, desc: str | None = None, **kwargs: Any) -> Any:
    """A tqdm bar whose progress shows in the notebook; use it like ``tqdm``."""
    from tqdm import std

    return std.tqdm(iterable, total=total, desc=desc, mininterval=0.1, **kwargs)


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
    if tree.body and isinstance(tree.body[-1], ast.Expr) and not _ends_with_semicolon(source):
        last = ast.Expression(tree.body.pop().value)
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


def error_frame(request_id: int, exc: BaseException, code: str = "remote") -> wire.Frame:
    return wire.Frame("error", request_id, {
        "ename": type(exc).__name__,
        "evalue": str(exc),
        "traceback": remote_traceback(exc) if code == "remote" else [],
        "code": code,
    })


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
    fields: dict[str, Any] = {}
    if outlet is not None and value is not None:
        fields["mime"] = mimebundle(value)[0]
    try:
        buffers = wire.dumps(value)
    except Exception as exc:
        if outlet is not None:  # a cell's value still shows through its repr
            return wire.Frame("result", rid, {**fields, "unpicklable": f"{type(value).__name__}: {exc}"})
        what = f"{names[0]!r}" if names and len(names) == 1 else f"the {type(value).__name__} value"
        if names and len(names) > 1:
            what = "one of " + ", ".join(map(repr, names))
        return error_frame(rid, TypeError(
            f"cannot send {what} back: it cannot be pickled ({type(exc).__name__}: {exc}). Keep it remote in "
            "a variable and pull plain data (numbers, lists, arrays, tensors) instead"), "pickle")
    return wire.Frame("result", rid, fields, buffers)


def versions_mismatch(python: str, cloudpickle: str) -> str | None:
    """The one line a user reads when the two ends cannot exchange pickled code, or None."""
    here_python, here_cp = wire.PYTHON_VERSION, wire.cloudpickle_version()
    if python == here_python and cloudpickle == here_cp:
        return None
    return (f"Python {python} / cloudpickle {cloudpickle} here, Python {here_python} / cloudpickle {here_cp} "
            "on the server: pickled code (run, submit, @remote) is refused; cells and plain data still work. "
            f"Use Python {here_python} and `pip install cloudpickle=={here_cp}` on the notebook side")
