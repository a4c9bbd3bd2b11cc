"""``%mymps`` and ``%%mymps``: thin magics over one `Client`.

Each subcommand parses its arguments (IPython's ``MagicArgumentParser``: a bad one is a
``UsageError`` line) and calls one `Client` method. Errors a user can cause are `MympsError`s,
which IPython shows as their one line (``_render_traceback_``); an exception from the user's own
remote code shows its remote traceback.
"""

from __future__ import annotations

import argparse
import io
import shlex
import sys
import time
from typing import Any, Callable

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser
from IPython.display import Image, display

from mymps_magic.client import Client
from mymps_magic.display import RemoteValue
from mymps_magic.wire import GenerateRequest

_EXAMPLES = """\
Examples:
  %mymps connect localhost:5555 --token-file ~/.mymps/token
  %mymps status                      # server, device memory, models, jobs
  %mymps health | models | stats | jobs
  %mymps load microsoft/phi-2 --dtype float16
  %mymps generate microsoft/phi-2 "The meaning of life is" --max-new-tokens 32
  %mymps image sd-model "a red fox" --steps 20 --seed 1
  %mymps push x y                    # local variables -> the remote namespace
  %mymps pull loss_curve             # remote variables -> the local namespace
  %mymps unload microsoft/phi-2
  %mymps reset                       # clear the remote namespace (models stay loaded)
  %mymps interrupt                   # KeyboardInterrupt in the running remote code

  %%mymps --push data --pull result --timeout 600
  result = model_fn(torch.as_tensor(data, device=DEVICE)).cpu()

In a %%mymps cell: DEVICE, models (the loaded ones), torch, np, display() and progress()
are defined. Give the token with MYMPS_TOKEN or --token-file; --token T works, but the token then
stays in the notebook's history."""


def _parser() -> MagicArgumentParser:
    p = MagicArgumentParser(prog="%mymps", description="Use a remote accelerator from this notebook.",
                            epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=MagicArgumentParser)

    c = sub.add_parser("connect", help="connect to a server (replaces this notebook's client)")
    c.add_argument("address", nargs="?", help="HOST:PORT (default MYMPS_SERVER_HOST/PORT, else 127.0.0.1:5555)")
    c.add_argument("--token-file", help="file holding the server's token")
    c.add_argument("--token", help="the token itself (it stays in the notebook history: prefer --token-file)")
    for name, text in [("status", "server, device memory, models and jobs at a glance"),
                       ("health", "server status (needs no token)"), ("models", "the loaded models"),
                       ("stats", "CPU, RAM and device memory"), ("jobs", "running and queued jobs"),
                       ("reset", "clear the remote namespace; models stay loaded"),
                       ("interrupt", "KeyboardInterrupt in this session's running remote code"),
                       ("help", "this help")]:
        sub.add_parser(name, help=text)
    load = sub.add_parser("load", help="load a model onto the device (progress bar)")
    load.add_argument("name")
    load.add_argument("--kind", help="text, diffusion, auto, torchscript or checkpoint (default: found from NAME)")
    load.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    load.add_argument("--path", help="load from this source under NAME")
    load.add_argument("--model-class", help="for checkpoint: package.module:ClassName")
    unload = sub.add_parser("unload", help="unload a model and free its memory")
    unload.add_argument("name")
    gen = sub.add_parser("generate", help="generate text, streamed into the cell")
    gen.add_argument("name")
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=int, default=GenerateRequest.max_new_tokens)
    gen.add_argument("--temperature", type=float, default=GenerateRequest.temperature)
    gen.add_argument("--top-p", type=float, default=GenerateRequest.top_p)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--no-stream", action="store_true", help="print the text once, at the end")
    img = sub.add_parser("image", help="make images with a diffusion model and show them")
    img.add_argument("name")
    img.add_argument("prompt")
    img.add_argument("--steps", type=int, default=20)
    img.add_argument("--seed", type=int)
    img.add_argument("--num-images", type=int, default=1)
    for verb, text in [("push", "local variables -> the remote namespace"),
                       ("pull", "remote variables -> the local namespace")]:
        sp = sub.add_parser(verb, help=text)
        sp.add_argument("names", nargs="+", metavar="VAR")
    return p


def _cell_parser() -> MagicArgumentParser:
    p = MagicArgumentParser(prog="%%mymps", description="Run the cell in the remote session namespace.")
    p.add_argument("--push", default="", help="comma-separated local variables to send first")
    p.add_argument("--pull", default="", help="comma-separated remote variables to bring back after")
    p.add_argument("--timeout", type=float, help="interrupt the remote code after this many seconds")
    return p


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise UsageError(f"not variable names: {', '.join(bad)} (use --push a,b)")
    return names


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
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


@magics_class
class MympsMagics(Magics):
    """The magics hold the notebook's one `Client`; every other object comes from it."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.client: Client | None = None
        self._parser = _parser()
        self._cell_parser = _cell_parser()
        self.mymps.__func__.__doc__ = self._parser.format_help()  # type: ignore[attr-defined]

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
        try:
            args = self._parser.parse_args(shlex.split(line))
        except ValueError as exc:  # unbalanced quotes
            raise UsageError(f"cannot parse {line!r}: {exc}") from None
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
        print(_table(rows, ["name", "kind", "dtype", "device", "params", "size", "used"]) if rows else "No models loaded.")

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
        c = self.connected
        start = time.perf_counter()
        h = c.health()
        latency = (time.perf_counter() - start) * 1e3
        print(f"Server  {c.settings.address}  mymps {h.get('version')}  ({latency:.1f} ms round trip)")
        self._stats(args)
        print()
        self._models(args)
        print()
        self._jobs(args)

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
        c = self.connected
        options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       seed=args.seed)
        if args.no_stream:
            result = c.generate(args.name, args.prompt, **options)
            sys.stdout.write(result["text"] + "\n")  # one write: the kernel may send print's newline apart
            stats = result
        else:
            with c.stream_generate(args.name, args.prompt, **options) as stream:
                for piece in stream:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            sys.stdout.write("\n")
            stats = stream.stats or {}
        # stdout, not stderr: a notebook shows stderr as an error box, and this is no error.
        sys.stdout.write(f"[{stats.get('tokens_generated')} tokens, {stats.get('tokens_per_s')} tokens/s, "
                         f"stopped by {stats.get('stop_reason')}]\n")

    def _image(self, args: argparse.Namespace) -> None:
        for image in self.connected.image(args.name, args.prompt, args.steps, seed=args.seed,
                                          num_images=args.num_images):
            png = io.BytesIO()
            image.save(png, format="PNG")
            display(Image(data=png.getvalue(), format="png"))  # PNG only: IPython adds a JPEG copy to PIL images

    def _push(self, args: argparse.Namespace) -> None:
        self.connected.push(**self._local(args.names))
        print(f"Pushed {', '.join(args.names)}.")

    def _pull(self, args: argparse.Namespace) -> None:
        values = self.connected.pull(*args.names)
        self.shell.user_ns.update(zip(args.names, values if len(args.names) > 1 else (values,)))
        print(f"Pulled {', '.join(args.names)}.")

    def _reset(self, args: argparse.Namespace) -> None:
        self.connected.reset()
        print("The remote namespace is empty again (models stay loaded).")

    def _interrupt(self, args: argparse.Namespace) -> None:
        self.connected.interrupt()

    def _local(self, names: list[str]) -> dict[str, Any]:
        missing = [n for n in names if n not in self.shell.user_ns]
        if missing:
            raise UsageError(f"not defined in this notebook: {', '.join(missing)}")
        return {n: self.shell.user_ns[n] for n in names}

    # -- the cell magic --------------------------------------------------------------------------

    def _cell(self, line: str, cell: str) -> RemoteValue | None:
        args = self._cell_parser.parse_argstring(line)
        pushes, pulls = _names(args.push), _names(args.pull)
        c = self.connected
        if pushes:
            c.push(**self._local(pushes))
        result = c.run_cell_rich(cell, timeout=args.timeout)
        if pulls:
            values = c.pull(*pulls)
            self.shell.user_ns.update(zip(pulls, values if len(pulls) > 1 else (values,)))
        return result
