"""The arguments of ``%mymps`` and ``%%mymps``: one parser per subcommand, each with ``--help``.

Kept apart from ``magics.py`` so that the magics stay a thin dispatch over `Client`. Every flag
mirrors a `Client` argument of the same name (``--guidance-scale`` is ``guidance_scale``).
"""

from __future__ import annotations

import argparse
import re
import shlex
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import MagicArgumentParser

from mymps_magic.wire import GenerateRequest

EXAMPLES = """\
Examples:
  %mymps connect localhost:5555 --token-file ~/.mymps/token
  %mymps status                      # a live panel: memory, models, jobs, with buttons
  %mymps health | models | stats | jobs
  %mymps load microsoft/phi-2 --dtype float16
  %mymps generate microsoft/phi-2 "The meaning of life is" --max-new-tokens 32 --stop "\\n\\n" --seed 1
  %mymps chat microsoft/phi-2 "Hello! Who are you?"   # the conversation goes on until --new
  %mymps image sd-model "a red fox" --steps 20 --seed 1 --width 512 --height 512
  %mymps push x y                    # local variables -> the remote namespace (x,y works too)
  %mymps pull loss_curve             # remote variables -> the local namespace
  %mymps unload microsoft/phi-2
  %mymps reset                       # clear the remote namespace (models stay loaded)
  %mymps interrupt                   # KeyboardInterrupt in the running remote code
  %mymps wait                        # the output and value of the last %%mymps --noblock cell
  %mymps on                          # every following cell runs remotely, until %mymps off
  %mymps generate --help             # one subcommand's options

  %%mymps --push data --pull result --timeout 600
  result = model_fn(torch.as_tensor(data, device=DEVICE)).cpu()

  %%mymps --noblock
  train(epochs=20)                   # the cell returns a handle at once; %mymps wait shows the rest

In a %%mymps cell: DEVICE, models (the loaded ones), torch, np, display() and progress()
are defined. Give the token with MYMPS_TOKEN or --token-file; --token T works, but the token then
stays in the notebook's history."""


def _add_names(parser: argparse.ArgumentParser, flag: str, text: str) -> None:
    """A list of variable names, spelt ``a,b``, ``a b`` or ``a, b`` alike (see `names`)."""
    parser.add_argument(flag, nargs="+", default=[], metavar="VAR", help=text)


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    """The generation flags ``generate`` and ``chat`` share (`sampling` reads them back)."""
    parser.add_argument("--max-new-tokens", type=int, default=GenerateRequest.max_new_tokens)
    parser.add_argument("--temperature", type=float, help="0 means greedy (default: the model's generation_config)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass (default: the model's)")
    parser.add_argument("--top-k", type=int, help="sample among the K likeliest tokens, 0: all (default: the model's)")
    parser.add_argument("--repetition-penalty", type=float, help="1: off, above 1 repeats less (default: the model's)")
    parser.add_argument("--seed", type=int, help="makes sampling repeatable")
    parser.add_argument("--stop", action="append", metavar="TEXT", help="end when this text is produced (repeatable)")


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    """`Client.generate`'s keyword arguments out of the flags of `_add_sampling`."""
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "seed": args.seed, "stop": args.stop, "top_k": args.top_k, "repetition_penalty": args.repetition_penalty}


def line_parser() -> MagicArgumentParser:
    p = MagicArgumentParser(prog="%mymps", description="Use a remote accelerator from this notebook.", epilog=EXAMPLES,
                formatter_class=argparse.RawDescriptionHelpFormatter, add_help=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=MagicArgumentParser)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        # help is %-formatted (the listing), description is not (the subcommand's own --help).
        parser: argparse.ArgumentParser = sub.add_parser(
            name, help=text.replace("%", "%%"), description=text, add_help=True,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        return parser

    c = command("connect", "connect to a server (replaces this notebook's client)")
    c.add_argument("address", nargs="?", help="HOST:PORT (default MYMPS_SERVER_HOST/PORT, else 127.0.0.1:5555)")
    c.add_argument("--token-file", help="file holding the server's token")
    c.add_argument("--token", help="the token itself (it stays in the notebook history: prefer --token-file)")
    status = command("status", "a live panel: device memory, models (Unload, Load) and jobs (Cancel)")
    status.add_argument("--interval", type=float, default=5.0, metavar="S", help="seconds between refreshes")
    for name, text in [("health", "server status (needs no token)"), ("models", "the loaded models"),
                       ("stats", "CPU, RAM and device memory"), ("jobs", "running and queued jobs"),
                       ("reset", "clear the remote namespace; models stay loaded"),
                       ("interrupt", "KeyboardInterrupt in this session's running remote code"),
                       ("on", "run every following cell remotely (as %%mymps) until %mymps off"),
                       ("off", "run cells locally again"),
                       ("help", "this help")]:
        command(name, text)
    load = command("load", "load a model onto the device (progress bar)")
    load.add_argument("name")
    load.add_argument("--kind", help="text, diffusion, auto, torchscript or checkpoint (default: found from NAME)")
    load.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    load.add_argument("--path", help="load from this source under NAME")
    load.add_argument("--model-class", help="for checkpoint: package.module:ClassName")
    command("unload", "unload a model and free its memory").add_argument("name")
    gen = command("generate", "generate text, streamed into the cell")
    gen.add_argument("name", help="a loaded text model")
    gen.add_argument("prompt", help="the text to continue (quote it)")
    _add_sampling(gen)
    gen.add_argument("--no-stream", action="store_true", help="print the text once, at the end")
    chat = command("chat", "chat with a text model through its chat template; the conversation is kept per "
                   "model until --new")
    chat.add_argument("name", help="a loaded text model")
    chat.add_argument("message", nargs="?", help="your message (quote it)")
    chat.add_argument("--new", action="store_true", help="start a new conversation (forget the one kept)")
    chat.add_argument("--system", metavar="TEXT", help="the system message of a new conversation")
    _add_sampling(chat)
    chat.add_argument("--no-stream", action="store_true", help="print the reply once, at the end")
    img = command("image", "make images with a diffusion model and show them")
    img.add_argument("name", help="a loaded diffusion model")
    img.add_argument("prompt", help="what to draw (quote it)")
    img.add_argument("--steps", type=int, default=20)
    img.add_argument("--seed", type=int, help="makes the images repeatable")
    img.add_argument("--width", type=int, help="in pixels, a multiple of 8 (default: the pipeline's)")
    img.add_argument("--height", type=int, help="in pixels, a multiple of 8 (default: the pipeline's)")
    img.add_argument("--guidance-scale", type=float, help="how closely to follow the prompt (default: the pipeline's)")
    img.add_argument("--num-images", type=int, default=1)
    _add_names(command("push", "local variables -> the remote namespace"), "names", "names, as a b or a,b")
    _add_names(command("pull", "remote variables -> the local namespace"), "names", "names, as a b or a,b")
    wait = command("wait", "show a --noblock cell's output and value once it is done")
    wait.add_argument("handle", nargs="?", help="the cell's handle, e.g. h or Out[3] (default: the last one)")
    return p


def cell_parser() -> MagicArgumentParser:
    p = MagicArgumentParser(prog="%%mymps", description="Run the cell in the remote session namespace.", add_help=True,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_names(p, "--push", "local variables to send first (a,b or a b)")
    _add_names(p, "--pull", "remote variables to bring back after (a,b or a b)")
    p.add_argument("--timeout", type=float, help="interrupt the remote code after this many seconds")
    p.add_argument("--noblock", action="store_true",
                   help="return at once with a handle (also in _); %%mymps wait shows its output and value")
    return p


def parse(parser: MagicArgumentParser, line: str) -> argparse.Namespace | None:
    """The parsed arguments of a magic's line; None when ``--help`` printed the help instead.

    Raises:
        UsageError: the line does not parse (unbalanced quotes, an unknown flag, a bad value).
    """
    try:
        argv = shlex.split(line)
    except ValueError as exc:  # unbalanced quotes
        raise UsageError(f"cannot parse {line!r}: {exc}") from None
    try:
        return parser.parse_args(argv)
    except SystemExit:  # argparse exits after printing the help; the magic just ends
        return None


def names(words: list[str]) -> list[str]:
    """Variable names from ``a,b``, ``a b`` or ``a, b`` (the same for the line and the cell magic).

    Raises:
        UsageError: a name that is not a Python identifier.
    """
    found = [n for word in words for n in re.split(r"[,\s]+", word) if n]
    bad = [n for n in found if not n.isidentifier()]
    if bad:
        raise UsageError(f"not variable names: {', '.join(bad)} (give names as a,b or a b)")
    return found


def namespace_values(namespace: dict[str, Any], wanted: list[str]) -> dict[str, Any]:
    """The notebook's values of ``wanted``.

    Raises:
        UsageError: a name the notebook does not define.
    """
    missing = [n for n in wanted if n not in namespace]
    if missing:
        raise UsageError(f"not defined in this notebook: {', '.join(missing)}")
    return {n: namespace[n] for n in wanted}
