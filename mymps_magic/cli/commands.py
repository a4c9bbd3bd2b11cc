"""The shell commands for people outside Jupyter: ``mymps status``, ``models``, ``load``, ``unload``,
``jobs``, ``cancel`` and ``generate``, each over the public `Client` API.

Each prints one line per item (a fact, a model, a job) in aligned columns (`columns.py`), and
a `MympsError` becomes one line on stderr and exit status 1: the error's own message already says
what to do (start the tunnel, fix the token, load the model first). Generated text goes to stdout
as it comes and the figures to stderr, so that ``mymps generate ... > file`` keeps only the text.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from mymps_magic import errors
from mymps_magic._humanize import ago, size
from mymps_magic.cli.columns import table
from mymps_magic.client import Client

__all__ = ["VERBS", "run"]

SIGINT_STATUS = 130
"""A shell's status for a command ended by Ctrl-C (128 + SIGINT)."""


def run(args: argparse.Namespace) -> int:
    """Run the verb ``args.verb`` against the server that `Client` finds (the flags over MYMPS_*).

    Returns:
        The exit status: 0, 1 after a `MympsError` (its message on stderr), or 130 after Ctrl-C
        (a generation is stopped on the server first).
    """
    try:
        with Client(args.host, args.port, token_file=args.token_file) as client:
            return VERBS[args.verb](client, args)
    except errors.MympsError as exc:
        print(f"mymps {args.verb}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while waiting for the server: the shell's answer, not a traceback
        print(f"mymps {args.verb}: interrupted.", file=sys.stderr)
        return SIGINT_STATUS


def _status(client: Client, args: argparse.Namespace) -> int:
    started = time.perf_counter()
    health = client.health()
    latency_ms = (time.perf_counter() - started) * 1000
    stats = client.stats()
    device, jobs = stats["device"], stats["jobs"]
    memory = f"{size(device['allocated'])} / {size(device['total'])}"
    if device["kind"] == "mps":  # Metal's own figure includes its caches; the allocated one does not
        memory += f" (driver {size(device['driver'])})"
    facts = [
        ("server", f"mymps {health['version']} at {client.settings.address} (protocol {health['protocol']}, "
                   f"python {health['python']}, torch {health['torch']})"),
        ("device", f"{health['device']} ({health['device_name']})"),
        ("memory", memory),
        ("models", f"{len(health['models'])} loaded"),
        ("jobs", f"{jobs['running']} running, {jobs['queued']} queued"),
        ("latency", f"{latency_ms:.1f} ms"),
    ]
    _print_lines(table(facts))
    return 0


def _models(client: Client, args: argparse.Namespace) -> int:
    models = client.models()
    if not models:
        print("No models loaded. Load one with: mymps load NAME")
        return 0
    rows = [[m["name"], m["kind"], m["dtype"], m["device"], size(m["bytes"]), _count(m["parameters"]),
             ago(m["loaded_at"]), ago(m["last_used"])] for m in models]
    _print_lines(table([["NAME", "KIND", "DTYPE", "DEVICE", "SIZE", "PARAMS", "LOADED", "LAST USED"], *rows]))
    return 0


def _load(client: Client, args: argparse.Namespace) -> int:
    answer = client.load_model(args.name, args.kind, args.dtype)
    if answer.get("already_loaded"):
        print(f"{args.name} was already loaded ({answer['kind']}, {answer['dtype']}) on {answer['device']}.")
    else:
        print(f"Loaded {args.name} ({answer['kind']}, {answer['dtype']}) on {answer['device']} "
              f"in {answer['load_time_s']:.1f} s.")
    return 0


def _unload(client: Client, args: argparse.Namespace) -> int:
    answer = client.unload_model(args.name)
    print(f"Unloaded {args.name}, freed {size(answer['freed_bytes'])}.")
    return 0


def _jobs(client: Client, args: argparse.Namespace) -> int:
    jobs = client.jobs()
    if not jobs:
        print("No jobs running or queued.")
        return 0
    rows = [[job["id"], job["kind"], job["state"], job.get("model") or "-", job.get("session") or "-",
             "-" if job.get("progress") is None else f"{job['progress']:.0%}", ago(job["submitted"])]
            for job in jobs]
    _print_lines(table([["ID", "KIND", "STATE", "MODEL", "SESSION", "PROGRESS", "AGE"], *rows]))
    return 0


def _cancel(client: Client, args: argparse.Namespace) -> int:
    client.cancel(args.id)
    print(f"Cancelled job {args.id}.")
    return 0


def _generate(client: Client, args: argparse.Namespace) -> int:
    """Print the pieces as they come; Ctrl-C leaves the stream, which stops the job on the server
    before it returns (`TokenStream.close`), so that the job is gone when the shell prompt is back."""
    options = {key: getattr(args, key) for key in ("max_new_tokens", "temperature", "top_p", "seed", "stop")}
    stream = client.stream_generate(args.name, args.prompt,
                                    **{key: value for key, value in options.items() if value is not None})
    interrupted = False
    try:
        with stream:
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
    except KeyboardInterrupt:  # a second Ctrl-C while the server stops lands here too
        interrupted = True
    print(flush=True)
    stats: dict[str, Any] = stream.stats or {}
    if interrupted:
        print(f"mymps generate: cancelled after {stats.get('tokens_generated', 0)} tokens.", file=sys.stderr)
        return SIGINT_STATUS
    if stats.get("stop_reason") == "cancelled":
        print("mymps generate: the job was cancelled on the server.", file=sys.stderr)
        return 1
    print(f"{stats['tokens_generated']} tokens in {stats['time_s']:.2f} s, {stats['tokens_per_s']:.1f} tokens/s, "
          f"stopped: {stats['stop_reason']}", file=sys.stderr)
    return 0


def _count(parameters: int | None) -> str:
    """A parameter count as people say it: ``124M``, ``7.2B``."""
    if parameters is None:
        return "-"
    for scale, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "K")):
        if parameters >= scale:
            return f"{parameters / scale:.1f}{suffix}"
    return str(parameters)


def _print_lines(lines: list[str]) -> None:
    print("\n".join(lines))


VERBS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "status": _status,
    "models": _models,
    "load": _load,
    "unload": _unload,
    "jobs": _jobs,
    "cancel": _cancel,
    "generate": _generate,
}
"""Each verb's function, by name; `cli.main` adds a parser for each."""
