"""``mymps serve``: the server as a child process, brought back when it crashes.

The server runs user code in the process that holds the device, so a segfault in a C extension,
``os._exit`` in a cell or the out-of-memory killer ends the accelerator with it. ``mymps serve`` is
therefore a small supervisor (standard library only: it never imports torch, so it costs a few
MiB and cannot itself crash in user code) that runs ``python -m kernel_server ARGS`` as its child:

- The child ends by itself with status 0 (a SIGTERM or SIGINT it got, forwarded or not): the
  supervisor ends too, with 0. A clean stop is never undone.
- The child fails to start, with status 2 (a busy port, a missing device; it printed the one-line
  reason): the supervisor ends with 2, since starting again would fail the same way. It tells
  this from user code's ``os._exit(2)`` by the run marker (``kernel_server.lifecycle``): a server
  that started has written ``running-<pid>.json`` in its home, and a crash leaves it there.
- Any other end (a signal such as SIGKILL or SIGSEGV, ``os._exit(n)``, an uncaught error) is a
  crash: the supervisor prints one line naming the cause and starts the child again with
  ``--restore``, so the models loaded before come back. The restarted server reports the restart
  count and the cause (hidden ``--restarts`` / ``--last-crash`` options) in ``GET /health``,
  where a client whose session was lost reads it for its one-line message.
- Restarts back off: the first at once, then 0.5, 1, 2, 4 s. :data:`CRASH_LOOP` crashes within
  :data:`CRASH_WINDOW_S` seconds is a crash loop (user code that crashes at every start, a broken
  install): the supervisor stops with one line and status 1, for a person (or launchd/systemd,
  see `service`) to look at.

SIGTERM and SIGINT sent to the supervisor are forwarded to the child, which stops as
``python -m kernel_server`` does, and so is SIGHUP (the terminal closed), as SIGTERM; the child
runs in a session of its own, so a Ctrl-C at the terminal reaches it once, through the
supervisor, and not twice. (A supervisor killed outright leaves its child serving; under systemd,
``KillMode=mixed`` ends it too.) Restarts listen on the same
``--port`` (the server binds with ``SO_REUSEADDR``); for ``--port 0`` the supervisor picks the
free port once. ``python -m kernel_server`` alone stays unsupervised.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

__all__ = ["CRASH_LOOP", "CRASH_WINDOW_S", "Supervisor", "describe_exit"]

CRASH_LOOP = 5
CRASH_WINDOW_S = 60.0
BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 4.0)
"""Delay before the restart that follows the 1st, 2nd, ... crash in a row (the last repeats)."""
START_ERROR = 2
"""The server's exit status for a start-up problem it has already explained in one line."""


SIGNAL_HINTS = {
    "SIGKILL": "kill -9, or the system's out-of-memory killer",
    "SIGSEGV": "a segmentation fault: a crash in C code",
    "SIGBUS": "a bus error: a crash in C code",
    "SIGABRT": "an abort, often a failed check in C code",
}
"""What each crash signal most often means, for the one line a user reads."""


def describe_exit(returncode: int) -> str:
    """How a child process ended, as a clause: ``"was killed by SIGKILL (kill -9, or the system's
    out-of-memory killer)"``, ``"exited with status 3"``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}" + (f" ({SIGNAL_HINTS[name]})" if name in SIGNAL_HINTS else "")
    return f"exited with status {returncode}"


class Supervisor:
    """Runs the server command, restarts it after crashes, forwards stop signals.

    Args:
        command: the child's command line, without ``--restore`` (added on restarts).
        home: the server's home, where a started child keeps its run marker.
    """

    def __init__(self, command: Sequence[str], home: Path) -> None:
        self.command = list(command)
        self.home = home
        self.restarts = 0
        self.last_crash: str | None = None
        self._crashes: deque[float] = deque()
        self._stop_signal: int | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._forwarded: int | None = None  # the pid the stop signal went to: it goes to a child once

    def child_command(self) -> list[str]:
        """The command line of the next start: a restart adds ``--restore`` and what it recovers from."""
        if not self.restarts:
            return list(self.command)
        extra = ["--restarts", str(self.restarts), "--last-crash", self.last_crash or "unknown"]
        return self.command + ([] if "--restore" in self.command else ["--restore"]) + extra

    def run(self) -> int:
        """Supervise until a clean stop or a crash loop; returns the exit status for ``mymps serve``."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._forward)
        # The handler runs on this (the main) thread between two bytecodes: no lock, but a signal
        # that comes while a child starts is forwarded once it is there.
        while self._stop_signal is None:
            self._child = subprocess.Popen(self.child_command(), start_new_session=True)
            self._forward_stop()
            returncode = self._child.wait()
            if returncode == 0 or self._stop_signal is not None:
                return returncode
            if returncode == START_ERROR and not (self.home / f"running-{self._child.pid}.json").exists():
                return START_ERROR
            delay = self._crashed(returncode)
            if delay is None:
                return 1
            if delay:
                time.sleep(delay)
        return 0

    def _crashed(self, returncode: int) -> float | None:
        """Note a crash; the delay before the restart, or None in a crash loop."""
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > CRASH_WINDOW_S:
            self._crashes.popleft()
        pid = self._child.pid if self._child is not None else "?"
        self.last_crash = f"the server process (pid {pid}) {describe_exit(returncode)}"
        if len(self._crashes) >= CRASH_LOOP:
            _say(f"{self.last_crash}: {len(self._crashes)} crashes in {CRASH_WINDOW_S:g} s, so it is not started "
                     "again; see server.log in its home for the cause, then start it with `mymps serve --restore`")
            return None
        self.restarts += 1
        delay = BACKOFF_S[min(len(self._crashes), len(BACKOFF_S)) - 1]
        _say(f"{self.last_crash}; starting it again with --restore (restart {self.restarts}"
                 + (f", in {delay:g} s)" if delay else ")"))
        return delay

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        """A stop signal: pass it on to the child, and start no other. A second one is passed on
        too: the server takes it as "stop now", as it would from a terminal. SIGHUP goes on as
        SIGTERM: the server stops on that one, as it used to on the hang-up itself."""
        self._stop_signal = signal.SIGTERM if signum == signal.SIGHUP else signum
        self._forwarded = None
        self._forward_stop()

    def _forward_stop(self) -> None:
        child, signum = self._child, self._stop_signal
        if child is None or signum is None or self._forwarded == child.pid or child.poll() is not None:
            return
        self._forwarded = child.pid
        child.send_signal(signum)


def _say(line: str) -> None:
    print(f"mymps serve: {line}", file=sys.stderr, flush=True)


def serve(argv: list[str], host: str, port: int, home: Path) -> int:
    """``mymps serve ARGS``: supervise ``python -m kernel_server ARGS`` (see the module docstring).

    ``host``, ``port`` and ``home`` are what the options say: a port of 0 is picked here, once, so
    that every restart listens where clients found the first start."""
    if port == 0:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            argv = [*argv, "--port", str(probe.getsockname()[1])]
    return Supervisor([sys.executable, "-m", "kernel_server", *argv], home).run()
