"""Where user code's output goes while it runs: printed text, displays and tqdm bars as frames.

User code runs on the device worker (see ``jobs.py``). While it runs, what it prints, displays
and reports as progress goes to an :class:`Outlet`, which sends it to the session as frames
straight away; nothing waits for the code to finish.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from mymps_magic import wire

from .errors import Cancelled
from .richrepr import mimebundle

Emit = Callable[[wire.Frame], None]
"""Sends a frame to the session; safe to call from any thread."""


FLUSH_INTERVAL_S = 0.2
"""How long a partial line waits for its newline before it goes anyway (ipykernel's interval)."""


class Outlet:
    """Where one request's output goes: stream text, displays and progress bars as frames.

    Thread-safe: the user's code may write from threads of its own, and a timer thread sends
    partial lines. Two locks: ``_state`` (held for moments) guards the text waiting for its
    newline; ``_order``, held while a frame is sent, keeps frames in the order they were
    written even when sending waits for room (see ``outbox.Room``). A thread that must never
    wait (``may_wait`` says False: the event loop's, which brings the acks that make room)
    skips ``_order``, as its text skipped the wait for room before.
    """

    def __init__(self, emit: Emit, request_id: int, may_wait: Callable[[], bool] = lambda: True) -> None:
        self.emit = emit
        self.request_id = request_id
        self._may_wait = may_wait
        self._bars = itertools.count(1)
        self._partial: dict[str, str] = {}  # per stream, text written after its last newline
        self._since: dict[str, float] = {}  # per stream, when that line began
        self._state = threading.Lock()
        self._order = threading.RLock()
        self._timer: threading.Timer | None = None

    def _ordered(self) -> contextlib.AbstractContextManager[object]:
        return self._order if self._may_wait() else contextlib.nullcontext()

    def stream(self, name: str, text: str) -> None:
        """Send whole lines at once; the rest of a line waits for its newline, a flush, the
        next display or progress, or until it is :data:`FLUSH_INTERVAL_S` old. So ``print``'s
        text and the newline it writes apart travel (and show in the notebook) as one piece,
        while ``print(".", end="")`` in a loop still shows its dots as they come, in batches."""
        with self._ordered():
            with self._state:
                text = self._partial.pop(name, "") + text
                cut = text.rfind("\n") + 1
                if cut:
                    self._since.pop(name, None)
                if cut < len(text):
                    self._partial[name] = text[cut:]
                    self._since.setdefault(name, time.monotonic())
                    if self._timer is None:
                        self._start_timer(FLUSH_INTERVAL_S)
            if cut:
                self.emit(wire.stream(self.request_id, name, text[:cut]))

    def _start_timer(self, delay: float) -> None:
        # A timer, not a wait in the writer's thread: the user's code goes on meanwhile.
        self._timer = threading.Timer(delay, self._flush_late)
        self._timer.daemon = True
        self._timer.start()

    def flush(self, name: str | None = None) -> None:
        """Send what waits for a newline (of one stream, or of both)."""
        with self._ordered():
            with self._state:
                waiting = self._take([name] if name is not None else list(self._partial))
            for key, text in waiting:
                self.emit(wire.stream(self.request_id, key, text))

    def _take(self, names: list[str]) -> list[tuple[str, str]]:
        """Take the partial lines of ``names`` (``_state`` held); the timer stops with the last."""
        taken = [(name, self._partial.pop(name)) for name in names if name in self._partial]
        for name in names:
            self._since.pop(name, None)
        if not self._partial and self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return taken

    def _flush_late(self) -> None:
        """Send the partial lines that are old enough; wait again for the younger ones (a line
        that ends within the interval must never be cut, however long ago the timer started)."""
        with self._order:
            with self._state:
                if self._timer is None or self._timer.ident != threading.get_ident():
                    return  # flushed meanwhile: a newer timer (or none) is in charge
                self._timer = None
                now = time.monotonic()
                waiting = self._take([name for name, since in self._since.items() if now - since >= FLUSH_INTERVAL_S])
                if self._since:
                    self._start_timer(max(0.01, min(self._since.values()) + FLUSH_INTERVAL_S - now))
            # A job cancelled while its output waited for room: its text is dropped.
            with contextlib.suppress(Cancelled):
                for key, text in waiting:
                    self.emit(wire.stream(self.request_id, key, text))

    def display(self, *objs: Any) -> None:
        with self._ordered():
            self.flush()
            for obj in objs:
                data, metadata = mimebundle(obj)
                self.emit(wire.display(self.request_id, data, metadata))

    def new_bar(self) -> int:
        return next(self._bars)

    def progress(self, bar: int, fields: dict[str, Any]) -> None:
        with self._ordered():
            self.flush()
            self.emit(wire.progress(self.request_id, bar, fields))


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
                sys.stdout, sys.stderr = cls._stdout, cls._stderr
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
        std.tqdm.__init__, std.tqdm.display, std.tqdm.close = (  # type: ignore[method-assign]
            original_init, original_display, original_close)

    std.tqdm.__init__, std.tqdm.display, std.tqdm.close = __init__, display, close  # type: ignore[method-assign]
    return unhook


def progress(iterable: Any = None, total: int | None = None, desc: str | None = None, **kwargs: Any) -> Any:
    """A tqdm bar whose progress shows in the notebook; use it like ``tqdm``."""
    from tqdm import std

    return std.tqdm(iterable, total=total, desc=desc, mininterval=0.1, **kwargs)
