"""The ``mymps`` command: one verb per task of running mymps.

Each verb imports what it needs when it runs, so ``mymps --help`` stays instant and the light
client install can run every verb that does not need the server extra.
"""

from __future__ import annotations

import argparse
import sys

import mymps_magic

SERVER_EXTRA_HINT = "This needs the server extra: pip install '.[server]' (or 'mymps[server]')."

# Third-party modules of the server extra: a missing one means the extra is not installed,
# while any other ImportError is a bug that must not be hidden behind the hint above.
SERVER_EXTRA_MODULES = frozenset(
    {"torch", "transformers", "accelerate", "diffusers", "safetensors", "fastapi", "uvicorn", "psutil", "tokenizers"}
)


def main(argv: list[str] | None = None) -> int:
    """Run one ``mymps`` verb.

    Args:
        argv: the arguments after ``mymps``; ``sys.argv[1:]`` when None.

    Returns:
        The process exit status.
    """
    parser = argparse.ArgumentParser(prog="mymps", description="A remote accelerator for Jupyter notebooks.")
    parser.add_argument("--version", action="version", version=f"mymps {mymps_magic.__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True)
    # add_help=False: `mymps serve --help` passes through to the server's own options.
    verbs.add_parser(
        "serve",
        add_help=False,
        help="run the server on this machine (its options: mymps serve --help)",
        description="Run the server on this machine.",
    )
    verbs.add_parser(
        "demo",
        help="build a tiny model, start a local server and generate with it (no GPU, no downloads)",
        description="Build a tiny model, start a local server and generate with it.",
    )
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.verb == "serve":
        return _serve(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return _demo()


def _serve(argv: list[str]) -> int:
    try:
        from kernel_server.__main__ import main as serve
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in SERVER_EXTRA_MODULES:
            raise
        print(f"mymps serve: {exc.name} is missing. {SERVER_EXTRA_HINT}", file=sys.stderr)
        return 1
    return serve(argv)


def _demo() -> int:
    from mymps_magic import demo

    return demo.run()
