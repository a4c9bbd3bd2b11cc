"""The ``mymps`` command: one verb per task of running mymps.

Each verb imports what it needs when it runs, so ``mymps --help`` stays instant and the light
client install can run every verb that does not need the server extra. The verbs' modules live
beside this one: `tunnel` (with `tunnelsettings` and `tunnelcheck`), `deploy`, `demo` (over
`localserver`), and `ssh`, the OpenSSH command lines that tunnel and deploy share; `commands`
(with `columns`) holds the verbs that talk to a running server (status, models, load, unload,
jobs, cancel, generate), `supervise` runs `serve`'s server and brings it back after a crash,
`service` makes it a login service (launchd, systemd), and `dashboard` hands over to the
`mymps_magic.dashboard` package.
"""

from __future__ import annotations

import argparse
import sys

import mymps_magic
from mymps_magic.cli import token

__all__ = ["main"]

SERVER_VERBS = ("status", "models", "load", "unload", "jobs", "cancel", "generate")
"""The verbs of `commands`: each talks to a running server, found as `Client` finds it."""

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
    _add_tunnel(verbs)
    _add_deploy(verbs)
    _add_server_verbs(verbs)
    token.add_parser(verbs)
    # add_help=False: `mymps service --help` is the service module's own.
    verbs.add_parser("service", add_help=False,
                     help="run the server as a login service, restarted when it fails (install, uninstall, status, "
                          "logs; mymps service --help)",
                     description="Run the server as a login service.")
    # add_help=False: `mymps dashboard --help` passes through to the dashboard's own options.
    verbs.add_parser("dashboard", add_help=False,
                     help="serve the web dashboard on this machine (its options: mymps dashboard --help)",
                     description="Serve the web dashboard on this machine.")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.verb == "serve":
        return _serve(rest)
    if args.verb == "dashboard":
        return _dashboard(rest)
    if args.verb == "service":
        from mymps_magic.cli import service

        return service.run(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.verb in SERVER_VERBS:
        from mymps_magic.cli import commands

        return commands.run(args)
    if args.verb == "tunnel":
        return _tunnel(args)
    if args.verb == "deploy":
        return _deploy(args)
    if args.verb == "token":
        return token.run(args)
    return _demo()


def _ssh_options() -> argparse.ArgumentParser:
    """The ssh pass-through flags that `tunnel` and `deploy` share (ssh's own letters)."""
    ssh = argparse.ArgumentParser(add_help=False)
    ssh.add_argument("destination", nargs="?", metavar="[user@]host",
                     help="the remote machine (default: MYMPS_USER@MYMPS_HOST)")
    ssh.add_argument("-p", dest="ssh_port", type=int, metavar="SSH_PORT",
                     help="ssh port (default: MYMPS_SSH_PORT, else ssh's)")
    ssh.add_argument("-o", dest="ssh_options", action="append", default=[], metavar="OPTION",
                     help="an ssh option (repeatable), given to every ssh it runs; yours win over mymps's defaults")
    ssh.add_argument("-i", dest="identity", metavar="IDENTITY", help="ssh identity (private key) file")
    ssh.add_argument("-F", dest="config", metavar="CONFIG", help="ssh configuration file")
    return ssh


def _ssh_flags(args: argparse.Namespace) -> list[str]:
    flags = [item for option in args.ssh_options for item in ("-o", option)]
    if args.identity:
        flags += ["-i", args.identity]
    if args.config:
        flags += ["-F", args.config]
    return flags


def _add_tunnel(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tunnel = verbs.add_parser(
        "tunnel",
        parents=[_ssh_options()],
        help="open and keep up the SSH tunnel to the server, and fetch its token",
        description="Forward a local port to the server's port on the remote machine over ssh, copy the "
        "server's token into the local token file, and keep the tunnel up (reconnecting with backoff) until "
        "Ctrl-C. Defaults: MYMPS_USER, MYMPS_HOST, MYMPS_SSH_PORT, MYMPS_PORT.",
    )
    tunnel.add_argument("--local-port", type=int, metavar="N",
                        help="local end (default: MYMPS_SERVER_PORT, else MYMPS_PORT, else 5555)")
    tunnel.add_argument("--remote-port", type=int, metavar="N",
                        help="the server's port there (default: MYMPS_PORT, else 5555)")
    tunnel.add_argument("--remote-home", metavar="DIR",
                        help="the server's MYMPS_HOME there, where its token is "
                             "(default: its $MYMPS_HOME, else ~/.mymps)")
    tunnel.add_argument("--check", action="store_true",
                        help="only test whether a server answers at the local end with our token; exit 0 or 1")


def _add_deploy(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    deploy = verbs.add_parser(
        "deploy",
        parents=[_ssh_options()],
        help="copy this project to the remote machine and install the server there",
        description="Mirror this project into --remote-dir on the remote machine (rsync over ssh, else a tar "
        "stream), make or reuse a virtual environment there, install the server extra into it (skipped when "
        "pyproject.toml is unchanged), and print how to start the server.",
    )
    deploy.add_argument("--remote-dir", metavar="DIR",
                        help="where the project goes; it becomes a mirror of it, its .venv kept (default: ~/mymps)")
    deploy.add_argument("--python", metavar="PATH",
                        help="the remote interpreter that makes the venv (default: python3)")
    deploy.add_argument("--system-site-packages", action="store_true",
                        help="let the venv see that interpreter's packages (a PyTorch already installed there)")
    deploy.add_argument("--pip-args", default="", metavar="ARGS",
                        help="more pip install options, as one shell-quoted string (e.g. an --index-url)")
    deploy.add_argument("--source", metavar="DIR", help="the project to copy (default: the checkout mymps runs from)")
    deploy.add_argument("--dry-run", action="store_true", help="print the exact commands and run none of them")


def _add_server_verbs(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The verbs of `commands`, each with the flags that override where `Client` finds the server."""
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--host", help="the server's host (default: MYMPS_SERVER_HOST, else 127.0.0.1)")
    server.add_argument("--port", help="its port (default: MYMPS_SERVER_PORT, else MYMPS_PORT, else 5555)")
    server.add_argument("--token-file", metavar="FILE",
                        help="file holding the server's token (default: MYMPS_TOKEN, else ~/.mymps/token)")

    def add(verb: str, help: str) -> argparse.ArgumentParser:
        return verbs.add_parser(verb, parents=[server], help=help, description=help[0].upper() + help[1:] + ".")

    add("status", "the server, its device and memory, counts of models and jobs, and the round-trip time")
    add("models", "the loaded models, one line each")
    load = add("load", "load a model onto the server's device, with a progress bar")
    load.add_argument("name", help="a hub id or a path on the server")
    # No argparse choices: the wire's Kind and DType are the one list, and a bad value's error names them.
    load.add_argument("--kind", help="text, diffusion, auto, torchscript or checkpoint (default: the server finds out)")
    load.add_argument("--dtype", default="auto", help="auto (float16 on mps/cuda, float32 on cpu), float32, float16 "
                                                      "or bfloat16 (default: auto)")
    add("unload", "unload a model and free its device memory").add_argument("name")
    add("jobs", "the running and queued jobs, one line each")
    add("cancel", "cancel a running or queued job").add_argument("id", help="a job's ID, as `mymps jobs` shows it")
    generate = add("generate", "generate text with a loaded model, printed as it comes (Ctrl-C cancels it)")
    generate.add_argument("name", help="a loaded text model")
    generate.add_argument("prompt")
    # Unset options are left out of the call, so that the defaults stay Client.stream_generate's.
    generate.add_argument("--max-new-tokens", type=int, metavar="N", help="(default: as Client.generate)")
    generate.add_argument("--temperature", type=float, metavar="T", help="0 for greedy (default: as Client.generate)")
    generate.add_argument("--top-p", type=float, metavar="P", help="(default: as Client.generate)")
    generate.add_argument("--seed", type=int, metavar="S", help="makes sampling repeatable")
    generate.add_argument("--stop", action="append", metavar="TEXT", help="stop when this is produced (repeatable)")


def _serve(argv: list[str]) -> int:
    """Check the options and the server extra here, then supervise the server (`supervise`): a
    child that cannot start would fail again at every restart, a crash loop instead of one line.
    (``kernel_server.__main__`` imports no torch: the supervisor stays small.)"""
    import importlib.util

    missing = next((name for name in sorted(SERVER_EXTRA_MODULES) if importlib.util.find_spec(name) is None), None)
    if missing is not None:
        print(f"mymps serve: {missing} is missing. {SERVER_EXTRA_HINT}", file=sys.stderr)
        return 1
    from kernel_server.__main__ import settings_from
    from kernel_server.errors import ServerStartError
    from mymps_magic.cli import supervise

    try:
        settings = settings_from(argv)  # --help, and a bad option's one line, before any child starts
    except ServerStartError as exc:
        print(f"mymps serve: {exc}", file=sys.stderr)
        return 2
    return supervise.serve(argv, settings.host, settings.port, settings.home)


def _dashboard(argv: list[str]) -> int:
    try:
        from mymps_magic.dashboard import main as dashboard
    except ModuleNotFoundError as exc:
        print(f"mymps dashboard: {exc.name} is missing. Install the dashboard extra: pip install 'mymps[dashboard]'",
              file=sys.stderr)
        return 1
    return dashboard(argv)


def _demo() -> int:
    from mymps_magic.cli import demo

    return demo.run()


def _tunnel(args: argparse.Namespace) -> int:
    from mymps_magic.cli.tunnel import Tunnel
    from mymps_magic.cli.tunnelcheck import check
    from mymps_magic.cli.tunnelsettings import TunnelSettings, resolve_local_port
    from mymps_magic.errors import MympsError

    try:
        if args.check:
            return check(resolve_local_port(args.local_port))
        settings = TunnelSettings.resolve(
            args.destination,
            ssh_port=args.ssh_port,
            ssh_options=_ssh_flags(args),
            local_port=args.local_port,
            remote_port=args.remote_port,
            remote_home=args.remote_home,
        )
    except MympsError as exc:  # a `CommandError`, or a `BadRequestError` naming a bad port
        print(f"mymps tunnel: {exc}", file=sys.stderr)
        return 2
    return Tunnel(settings).run()


def _deploy(args: argparse.Namespace) -> int:
    from mymps_magic.cli import deploy
    from mymps_magic.errors import MympsError

    try:
        plan = deploy.DeployPlan.resolve(
            args.destination,
            ssh_port=args.ssh_port,
            ssh_options=_ssh_flags(args),
            remote_dir=args.remote_dir,
            python=args.python,
            system_site_packages=args.system_site_packages,
            pip_args=args.pip_args,
            source=args.source,
        )
    except MympsError as exc:  # a `CommandError`, or a `BadRequestError` naming a bad port
        print(f"mymps deploy: {exc}", file=sys.stderr)
        return 2
    return deploy.run(plan, dry_run=args.dry_run)

