"""The IPython shell that runs a session's cells: IPython's own syntax, magics and display hook.

A remote cell should behave like a local one, so it runs through ``InteractiveShell.run_cell``
(input transformers for ``!cmd`` and ``%magic``, line and cell magics, the display hook that
keeps ``_``), in the session's own namespace. One shell per namespace, made on its first cell:
``run`` requests never need one. What would reach a terminal is redirected instead:

* the display hook does not print the cell's value: it keeps it, with its mimebundle
  (:mod:`.richrepr`), for the result frame, and keeps only the last three values (``_``,
  ``__``, ``___`` and their ``_N`` names; ``Out`` stays empty): a GPU server cannot keep every
  output, as IPython does, for the whole session;
* tracebacks are not printed: the error goes back as the request's error frame;
* magics that need a terminal or the notebook itself fail with one line (`UNSUPPORTED`).

The shell is not IPython's singleton (``InteractiveShell.instance()``), nor put in
``sys.modules`` as ``__main__`` would be: several sessions each have one, and a function
defined in a cell must still pickle by value.
"""

from __future__ import annotations

import atexit
import contextlib
import re
import shlex
import signal
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from IPython.core.compilerop import CachingCompiler
from IPython.core.displayhook import DisplayHook
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from traitlets import Type
from traitlets.config import Config

from .richrepr import mimebundle

KEPT_VALUES = 3
"""How many of a session's last cell values stay on the server (as ``_``, ``__``, ``___``)."""

SHELL_KEY = "__mymps_shell__"
"""The namespace's key for its shell, hidden from ``%who`` like IPython's own names."""

UNSUPPORTED: dict[str, str] = {
    "debug": "the server has no terminal to debug in; reproduce the error in a local cell",
    "pdb": "the server has no terminal to debug in; reproduce the error in a local cell",
    "edit": "it edits the server's files in a terminal editor; edit locally and push or %pip the code",
    "load": "it would fill a cell on the server; run it in a local cell",
    "paste": "it reads a terminal's clipboard; paste the code into the cell",
    "cpaste": "it reads a terminal's clipboard; paste the code into the cell",
    "recall": "the input history it recalls is the server's; copy the code instead",
    "rerun": "the input history it reruns is the server's; copy the code instead",
    "macro": "the input history it reads is the server's; define a function instead",
    "gui": "the server has no event loop of a GUI; display figures with display(fig)",
    "mymps": "it runs in the notebook: use it in a local cell",
}
"""Line magics a remote cell refuses, and why (the rest of IPython's work as they do locally)."""

UNSUPPORTED_CELL: dict[str, str] = {
    name: "its output needs the notebook's display machinery; return an IPython.display object instead"
    for name in ("html", "javascript", "js", "latex", "markdown", "svg")
} | {"mymps": "a remote cell cannot start another remote cell"}
"""Cell magics a remote cell refuses, and why."""

_IPYTHON_SYNTAX = re.compile(r"[!%?]|^[ \t\f]*(?:[,;/]|>>>|\.\.\.|In \[)", re.MULTILINE)
"""What IPython's static input transformers act on: ``!``, ``%`` and ``?`` anywhere (shell,
magics, help, ``x = !cmd``), and, at a line's start, the autocall escapes ``,;/`` and the
prompts of pasted sessions (``>>>``, ``...``, ``In [1]:``). Found anywhere, even in a string,
the cell takes IPython's full path: this only has to be sure of the cells it lets past."""

_INTERRUPTED = (-signal.SIGINT, 128 + signal.SIGINT)
"""The exit codes of a shell command stopped by the interrupt that ``system`` forwarded to it."""


class CellValueHook(DisplayHook):
    """The display hook: keeps the cell's value and its mimebundle for the result frame."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.bundle: dict[str, Any] | None = None
        self.kept: list[int] = []  # the numbers of the cells whose values are kept, newest first

    def write_output_prompt(self) -> None:
        """No ``Out[N]:`` prompt: the notebook shows the value as the cell's own output."""

    def compute_format_data(self, result: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        data, metadata = mimebundle(result)
        self.bundle = data
        return data, metadata

    def write_format_data(self, format_dict: Any, md_dict: Any = None) -> None:
        """Not printed: the bundle goes back in the result frame."""

    def update_user_ns(self, result: Any) -> None:
        """``_``, ``__``, ``___`` and ``_N`` for the last `KEPT_VALUES` cells, held by the namespace
        only (not by this hook nor ``Out``, as in IPython), so that emptying it (a reset, a
        session's end) frees a big value at once, not at the next run of the cyclic collector.
        Unlike IPython, ``_`` is updated even after the user assigned it (``for _ in ...``)."""
        user_ns: dict[str, Any] = self.shell.user_ns  # type: ignore[union-attr]
        user_ns["___"], user_ns["__"], user_ns["_"] = user_ns.get("__"), user_ns.get("_"), result
        self.kept.insert(0, self.prompt_count)
        user_ns[f"_{self.prompt_count}"] = result
        for number in self.kept[KEPT_VALUES:]:
            user_ns.pop(f"_{number}", None)
        del self.kept[KEPT_VALUES:]


class CellCompiler(CachingCompiler):
    """Names each cell ``<mymps-cell-N>``, as tracebacks and the client expect."""

    def get_code_name(self, raw_code: str, transformed_code: str, number: int) -> str:
        return f"<mymps-cell-{number}>"


class RemoteShell(InteractiveShell):
    """One session's IPython shell over its namespace; see the module docstring."""

    displayhook_class = Type(CellValueHook)
    compiler_class = Type(CellCompiler)

    def __init__(self, namespace: dict[str, Any], predefined: Iterable[str]) -> None:
        """``predefined``: the names the server gives every session, hidden from ``%who``."""
        config = Config()
        config.HistoryManager.enabled = False  # no sqlite file per session
        config.InteractiveShell.warn_venv = False
        super().__init__(config=config, user_ns=namespace)  # type: ignore[no-untyped-call]
        atexit.unregister(self.atexit_operations)  # else every session's shell lives until exit
        self.user_ns_hidden.update({name: namespace[name] for name in predefined if name in namespace})
        self.shown_error: BaseException | None = None
        for name, why in UNSUPPORTED.items():
            self.register_magic_function(_refusal(name, "%", why), "line", name)
        for name, why in UNSUPPORTED_CELL.items():
            self.register_magic_function(_refusal(name, "%%", why), "cell", name)
        self.register_magic_function(_pip_of(self), "line", "pip")

    def init_sys_modules(self) -> None:
        """Not registered as a module: a function defined in a cell must pickle by value."""

    def showtraceback(self, exc_tuple: Any = None, *args: Any, **kwargs: Any) -> None:
        """Not printed: `run` raises it, and the session sends it back as an error frame. Nor
        kept in ``sys.last_traceback`` as IPython does: its frames would keep their locals (a
        batch of tensors on the device, after an out-of-memory error) until the next error."""
        self.shown_error = exc_tuple[1] if exc_tuple is not None else sys.exc_info()[1]

    def _format_exception_for_storage(self, exception: BaseException, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """IPython (9) formats each error for its history with stack_data, whose caches then keep
        the failing frames (and their locals: tensors) alive; the error frame has the traceback."""
        return {"ename": type(exception).__name__, "evalue": str(exception), "traceback": []}

    def showsyntaxerror(self, filename: str | None = None, running_compiled_code: bool = False) -> None:
        self.showtraceback()

    def showindentationerror(self) -> None:
        self.showtraceback()

    def system_piped(self, cmd: str) -> None:
        """``!cmd``; the stop button stops the cell too, not only the command (IPython would
        go on with the rest of the cell)."""
        super().system_piped(cmd)  # type: ignore[no-untyped-call]
        if self.user_ns.get("_exit_code") in _INTERRUPTED:
            raise KeyboardInterrupt

    system = system_piped

    def transform_cell(self, raw_cell: str) -> str:
        """IPython's, but plain Python (most cells) skips the static input transformers, whose
        tokenizing is most of an empty cell's cost on the server (12 of 28 us per ``pass``);
        the rest, the single line's prefilter (automagic: ``pwd``, ``exit``) included, is IPython's."""
        if raw_cell[:1].isspace() or _IPYTHON_SYNTAX.search(raw_cell):  # also a leading blank line or indent
            cell: str = self.input_transformer_manager.transform_cell(raw_cell)
        else:
            cell = raw_cell if raw_cell.endswith("\n") else raw_cell + "\n"
        if len(cell.splitlines()) == 1:
            prefilter = self.prefilter_manager
            assert prefilter is not None  # made in __init__
            with self.builtin_trap:
                cell = prefilter.prefilter_lines(cell) + "\n"
        lines = cell.splitlines(keepends=True)
        for transform in self.input_transformers_post:
            lines = transform(lines)
        return "".join(lines)

    def should_run_async(self, raw_cell: str, *, transformed_cell: str | None = None,
                         preprocessing_exc_tuple: Any = None) -> bool:
        """IPython's, but without compiling a cell that never says ``await`` or ``async``: only
        those can await at its top level, and IPython compiles every cell once more to find out
        (``shell.run`` here: 73 -> 68 us for ``pass``, 1,300 -> 940 us for 30 lines)."""
        if transformed_cell is not None and "await" not in transformed_cell and "async" not in transformed_cell:
            return False
        return bool(super().should_run_async(raw_cell, transformed_cell=transformed_cell,
                                             preprocessing_exc_tuple=preprocessing_exc_tuple))

    @contextlib.contextmanager
    def _tee(self, channel: str) -> Iterator[None]:
        """IPython (9) keeps every cell's printed text for its history, for the whole session
        (too much on a server), by patching ``write`` onto ``sys.stdout``: the server's router,
        shared by every session. Nothing is kept here (and 2 us per cell are saved)."""
        yield

    def run(self, source: str) -> tuple[Any, dict[str, Any] | None, str]:
        """Run one cell; returns its value (None when it has none or ends in ``;``), the
        value's mimebundle, and the name it is kept under (``_N``: `Client` pulls it to fetch it).

        Raises:
            BaseException: what the cell raised (a ``SyntaxError``, a ``UsageError`` of a magic).
        """
        hook = self.displayhook
        assert isinstance(hook, CellValueHook)  # displayhook_class
        hook.bundle = None
        result = self.run_cell(source, store_history=True)  # type: ignore[no-untyped-call]
        self.last_execution_result = None  # it holds the value: only the namespace may
        # The error of the cell, else one a magic caught and showed, as IPython does; not kept
        # here, where its traceback would keep its frames' locals alive.
        error, self.shown_error = result.error_before_exec or result.error_in_exec or self.shown_error, None
        if error is not None:
            raise error
        handle = f"_{result.execution_count}"
        return (result.result, hook.bundle, handle) if hook.bundle is not None else (None, None, handle)


def _pip_of(shell: InteractiveShell) -> Any:
    def pip(line: str) -> None:
        """``%pip``, as IPython's but for its last line: there is no kernel to restart here."""
        shell.system(f"{shlex.quote(sys.executable)} -m pip {line}")  # type: ignore[no-untyped-call]
        print("Note: new packages import at once; packages the server had already imported keep their old "
              "version until the server restarts.")

    return pip


def _refusal(name: str, prefix: str, why: str) -> Any:
    def refuse(*args: Any) -> None:
        raise UsageError(f"{prefix}{name} is not supported in a remote cell: {why}")

    return refuse


def shell_of(namespace: dict[str, Any], predefined: Iterable[str]) -> RemoteShell:
    """The namespace's shell, made on its first cell (``predefined`` as for `RemoteShell`)."""
    shell = namespace.get(SHELL_KEY)
    if not isinstance(shell, RemoteShell):
        shell = RemoteShell(namespace, predefined)
        namespace[SHELL_KEY] = shell
        shell.user_ns_hidden[SHELL_KEY] = shell
    return shell

