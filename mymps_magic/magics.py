"""``%mymps`` and ``%%mymps``: thin magics over one `Client`.

Each subcommand parses its arguments (IPython's ``MagicArgumentParser``: a bad one is a
``UsageError`` line) and calls one `Client` method. Errors a user can cause are `MympsError`s,
which IPython shows as their one line (``_render_traceback_``); an exception from the user's own
remote code shows its remote traceback. The parsers live in ``_magic_args.py``, the
every-cell-remote mode (``%mymps on``) in ``_remote_mode.py``.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import Image, display

from mymps_magic import _magic_args
from mymps_magic._cellfuture import CellFuture
from mymps_magic._remote_mode import RemoteMode, show_marker
from mymps_magic.client import Client
from mymps_magic.display import RemoteValue

if TYPE_CHECKING:
    from mymps_magic._stream import TokenStream
    from mymps_magic.panel import Panel


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _ago(t: float | None) -> str:
    return "" if not t else f"{max(0.0, time.time() - t):.0f}s ago"


def notebook_client() -> Client:
    """The `Client` that ``%mymps`` uses in this notebook (connected on first use), so plain
    Python can share its session and namespace with the ``%%mymps`` cells.

    Raises:
        RuntimeError: not in IPython, or ``%load_ext mymps_magic`` was not run.
    """
    from IPython import get_ipython

    shell = get_ipython()
    magics = None if shell is None else shell.magics_manager.registry.get("MympsMagics")
    if magics is None:
        raise RuntimeError("run %load_ext mymps_magic first: there is no %mymps client in this session")
    return magics.connected  # type: ignore[no-any-return]


def _print_text(result: dict[str, Any]) -> str:
    """A whole generation's text, then its figures; returns the text."""
    sys.stdout.write(result["text"] + "\n")  # one write: the kernel may send print's newline apart
    _print_stats(result)
    return str(result["text"])


def _print_stream(stream: TokenStream) -> str:
    """A generation's pieces as they come, then its figures; returns the text."""
    pieces = []
    with stream:
        for piece in stream:
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    _print_stats(stream.stats or {})
    return "".join(pieces)


def _print_stats(stats: dict[str, Any]) -> None:
    # stdout, not stderr: a notebook shows stderr as an error box, and this is no error.
    sys.stdout.write(f"[{stats.get('tokens_generated')} tokens, {stats.get('tokens_per_s')} tokens/s, "
                     f"stopped by {stats.get('stop_reason')}]\n")


@magics_class
class MympsMagics(Magics):
    """The magics hold the notebook's one `Client`; every other object comes from it."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self._ipython: Any = shell  # Magics types its shell as optional; these magics always have one
        self.client: Client | None = None
        self.mode = RemoteMode(shell)
        self.last_cell: CellFuture | None = None
        self.conversations: dict[str, list[dict[str, str]]] = {}
        """Each model's conversation in ``%mymps chat``, kept until ``--new``."""
        self.panel: Panel | None = None
        """The panel ``%mymps status`` showed last, closed when the next one shows."""
        """The handle of the last ``%%mymps --noblock`` cell: what ``%mymps wait`` waits for."""
        self._parser = _magic_args.line_parser()
        self._cell_parser = _magic_args.cell_parser()
        help_text = f"{self._parser.format_help()}\n{self._cell_parser.format_help()}"
        MympsMagics.mymps.__doc__ = help_text  # what %mymps? shows

    @property
    def connected(self) -> Client:
        """The current client, made with the defaults on first use."""
        if self.client is None:
            self.client = Client()
        return self.client

    @line_cell_magic
    def mymps(self, line: str, cell: str | None = None) -> Any:
        if cell is not None:
            return self._cell(line, cell)
        args = _magic_args.parse(self._parser, line)
        if args is None:  # --help printed the help
            return None
        if args.command in (None, "help"):
            print(self._parser.format_help())
            return None
        handler: Callable[[argparse.Namespace], Any] = getattr(self, f"_{args.command}")
        try:
            return handler(args)
        except KeyboardInterrupt:  # the stop button: the call was stopped (a stream cancels its job)
            print(f"\n[%mymps {args.command} interrupted]", file=sys.stderr)
            return None

    # -- subcommands -----------------------------------------------------------------------------

    def _connect(self, args: argparse.Namespace) -> None:
        host = port = None
        if args.address:
            host, _, port_text = args.address.rpartition(":")
            if not host or not port_text.isdigit():
                raise UsageError(f"{args.address!r} is not HOST:PORT, e.g. localhost:5555")
            port = int(port_text)
        new = Client(host, port, token=args.token, token_file=args.token_file)
        health = new.health()
        new.models()  # /health needs no token: prove this one works before replacing the client
        if self.client is not None:
            self.client.close()
        self.client = new
        print(f"Connected to {new.settings.address}: mymps {health.get('version')} on "
              f"{health.get('device')} ({health.get('device_name')}), {len(health.get('models', []))} model(s) loaded")

    def _health(self, args: argparse.Namespace) -> None:
        h = self.connected.health()
        print(f"{h['status']}  mymps {h.get('version')}  python {h.get('python')}  torch {h.get('torch')}\n"
              f"device  {h.get('device')} ({h.get('device_name')})\n"
              f"models  {', '.join(h.get('models', [])) or 'none'}")

    def _models(self, args: argparse.Namespace) -> None:
        rows = [{**m, "size": _size(m.get("bytes", 0)), "params": f"{m.get('parameters', 0):,}",
                 "used": _ago(m.get("last_used"))} for m in self.connected.models()]
        columns = ["name", "kind", "dtype", "device", "params", "size", "used"]
        print(_table(rows, columns) if rows else "No models loaded.")

    def _stats(self, args: argparse.Namespace) -> None:
        s = self.connected.stats()
        d, ram, jobs = s["device"], s["ram"], s["jobs"]
        print(f"device  {d['kind']} ({d['name']}): {_size(d['allocated'])} allocated, {_size(d['driver'])} "
              f"in use of {_size(d['total'])}\n"
              f"ram     {_size(ram['used'])} of {_size(ram['total'])}   cpu {s['cpu_percent']:.0f}%\n"
              f"jobs    {jobs['running']} running, {jobs['queued']} queued")

    def _jobs(self, args: argparse.Namespace) -> None:
        rows = [{**j, "session": (j.get("session") or "")[:8], "model": j.get("model") or "",
                 "progress": "" if j.get("progress") is None else f"{100 * j['progress']:.0f}%",
                 "since": _ago(j.get("started") or j.get("submitted"))} for j in self.connected.jobs()]
        print(_table(rows, ["id", "kind", "state", "model", "session", "progress", "since"]) if rows else "No jobs.")

    def _status(self, args: argparse.Namespace) -> None:
        if not args.interval > 0:
            raise UsageError(f"--interval {args.interval:g}: give a positive number of seconds, e.g. 5")
        if self.panel is not None:  # one live panel per notebook: the old one stops refreshing
            self.panel.close()
        self.panel = self.connected.panel(interval=args.interval)
        display(self.panel)

    def _load(self, args: argparse.Namespace) -> None:
        answer = self.connected.load_model(args.name, args.kind, args.dtype, path=args.path,
                                           model_class=args.model_class)
        if answer.get("already_loaded"):
            print(f"{args.name} was already loaded.")
        else:
            print(f"Loaded {args.name} on {answer['device']} ({answer['dtype']}) in {answer['load_time_s']:.1f} s.")

    def _unload(self, args: argparse.Namespace) -> None:
        answer = self.connected.unload_model(args.name)
        print(f"Unloaded {args.name} ({_size(answer.get('freed_bytes', 0))} freed).")

    def _generate(self, args: argparse.Namespace) -> None:
        c, options = self.connected, _magic_args.sampling(args)
        if args.no_stream:
            _print_text(c.generate(args.name, args.prompt, **options))
        else:
            _print_stream(c.stream_generate(args.name, args.prompt, **options))

    def _chat(self, args: argparse.Namespace) -> None:
        if args.message is None and not args.new:
            raise UsageError(f'give the message: %mymps chat {args.name} "Hello" (--new alone starts over)')
        if args.system is not None and not args.new and self.conversations.get(args.name):
            raise UsageError("--system opens a new conversation: add --new")
        if args.new or args.name not in self.conversations:
            system = [] if args.system is None else [{"role": "system", "content": args.system}]
            self.conversations[args.name] = system
        if args.message is None:
            print(f"New conversation with {args.name}.")
            return
        c, options = self.connected, _magic_args.sampling(args)
        asked = [*self.conversations[args.name], {"role": "user", "content": args.message}]
        if args.no_stream:
            reply = _print_text(c.chat(args.name, asked, **options))
        else:
            reply = _print_stream(c.chat(args.name, asked, stream=True, **options))
        self.conversations[args.name] = [*asked, {"role": "assistant", "content": reply}]

    def _image(self, args: argparse.Namespace) -> None:
        images = self.connected.image(args.name, args.prompt, args.steps, seed=args.seed,
                                      guidance_scale=args.guidance_scale, width=args.width, height=args.height,
                                      num_images=args.num_images)
        for image in images:
            png = io.BytesIO()
            image.save(png, format="PNG")
            display(Image(data=png.getvalue(), format="png"))  # PNG only: IPython adds a JPEG copy to PIL images

    def _push(self, args: argparse.Namespace) -> None:
        names = _magic_args.names(args.names)
        self.connected.push(**_magic_args.namespace_values(self._ipython.user_ns, names))
        print(f"Pushed {', '.join(names)}.")

    def _pull(self, args: argparse.Namespace) -> None:
        names = _magic_args.names(args.names)
        self._pull_into_notebook(names)
        print(f"Pulled {', '.join(names)}.")

    def _pull_into_notebook(self, names: list[str]) -> None:
        values = self.connected.pull(*names)
        self._ipython.user_ns.update(zip(names, values if len(names) > 1 else (values,), strict=True))

    def _reset(self, args: argparse.Namespace) -> None:
        self.connected.reset()
        print("The remote namespace is empty again (models stay loaded).")

    def _interrupt(self, args: argparse.Namespace) -> None:
        if self.connected.interrupt():
            print("Interrupted this session's running code.")
        else:
            print("Nothing of this session is running: nothing to interrupt.")

    def _wait(self, args: argparse.Namespace) -> RemoteValue | None:
        handle = self.last_cell if args.handle is None else self._handle(args.handle)
        if handle is None:
            raise UsageError("no --noblock cell to wait for: start one with %%mymps --noblock")
        handle.display_outputs(wait=True)
        return handle.result()

    def _handle(self, expression: str) -> CellFuture:
        try:
            handle = self._ipython.ev(expression)
        except Exception as exc:
            raise UsageError(f"cannot read the handle {expression!r}: {type(exc).__name__}: {exc}") from None
        if not isinstance(handle, CellFuture):
            raise UsageError(f"{expression} is not a --noblock cell's handle (it is a {type(handle).__name__}); "
                             "give the name that holds one, or nothing for the last")
        return handle

    def _on(self, args: argparse.Namespace) -> None:
        if self.mode.on:
            print("Cells run remotely already; %mymps off runs them locally again.")
            return
        self.mode.start()
        print(f"Every following cell will run remotely on {self.connected.settings.address}, until %mymps off.")

    def _off(self, args: argparse.Namespace) -> None:
        was_on = self.mode.on
        self.mode.stop()
        print("Cells run locally again." if was_on else "Cells run locally already (%mymps on sends them).")

    # -- the cell magic --------------------------------------------------------------------------

    def _cell(self, line: str, cell: str) -> RemoteValue | CellFuture | None:
        args = _magic_args.parse(self._cell_parser, line)
        if args is None:  # --help printed the help
            return None
        pushes, pulls = _magic_args.names(args.push), _magic_args.names(args.pull)
        if args.noblock and pulls:
            raise UsageError("--pull waits for the cell, --noblock does not: after %mymps wait, %mymps pull the names")
        c = self.connected
        if pushes:
            c.push(**_magic_args.namespace_values(self._ipython.user_ns, pushes))
        if self.mode.on:
            show_marker(c.settings.address)
        if args.noblock:
            self.last_cell = c.submit_cell(cell, timeout=args.timeout)
            return self.last_cell
        result = c.run_cell_rich(cell, timeout=args.timeout)
        if pulls:
            self._pull_into_notebook(pulls)
        return result
