"""The server process's life: its log, the marker it leaves while it runs, and how it stops.

``server.log`` (in ``--home``) gets every ``kernel_server.*`` line at INFO and above, and the
tracebacks ``faulthandler`` writes when the process crashes in C (a segfault in user code or a
library). No line ever holds the token: a filter on the log's handlers replaces it. Only the
server's own lines: libraries' loggers (httpx, the hub, transformers) and the user's own
``logging`` calls are not ours to record (a user's warning, with no handler configured, reaches
the cell's stderr through Python's last-resort handler). uvicorn keeps its own stderr handler.

While the server runs it keeps ``running-<pid>.json`` in its home: who it is (pid, start time,
version, address) and what the device worker is doing now (a job's id, kind, session and model).
A clean stop removes the file; a run that ended any other way (``kill -9``, a segfault,
``os._exit`` in user code, a power cut) leaves it, and the next start on the same home logs one
line saying how that run ended and what it was running. The per-pid name lets two servers share
a home without mistaking each other's marker for a crash. Recording a job costs one ``pwrite``
of a fixed-width field when it starts and one when it ends, so it is done for every job.

Under ``mymps serve`` (``mymps_magic.cli.supervise``) a crashed server is started again by its
supervisor, which tells it how many times it did so and how the last run ended: `Restarts`, kept
in ``app.state`` and shown in ``GET /health`` (``restarts``, ``last_crash``), where a client whose
session was lost reads the cause for its one-line message.

SIGTERM and SIGINT are heard through ``signal.set_wakeup_fd`` on a thread of their own, not by
a Python handler: a handler runs only when the main thread next runs Python, which user code
stuck in a C call may never do. A stop first cancels the jobs and lets the HTTP server close its
connections; if that has not happened :data:`FORCE_AFTER_S` seconds after the signal (user
code that swallows ``KeyboardInterrupt``, a C call that never returns), or when a second signal
comes, it logs why and ends with ``os._exit`` (status 1). Once the server has stopped cleanly
the deadline is called off; threads user code left running are then not waited for (status 0).
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

log = logging.getLogger("kernel_server")

FORCE_AFTER_S = 10.0
FORCED_EXIT_STATUS = 1
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_ACTIVITY_WIDTH = 300  # bytes of the marker's "now" field; a longer activity is cut
_real_exit = os._exit  # the forced exit is ours, not user code's: it bypasses `watch_os_exit`


def private_file(path: Path) -> Path:
    """Create ``path`` (mode 0600) if missing, and narrow it to 0600 if others could read it.

    The server's files (log, state, marker) name models, paths and sessions: no one else's
    business on a shared machine, so they are private from the first byte, whatever the umask.
    """
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
    return path


class RedactToken(logging.Filter):
    """Replaces the tokens in a record's message and traceback: the log never holds one.

    ``tokens`` says which: every token the server has accepted (a rotated one too)."""

    def __init__(self, tokens: Callable[[], Iterable[str]]) -> None:
        super().__init__()
        self.tokens = tokens

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        for token in self.tokens():
            if token in message:
                message = message.replace(token, "<token>")
                record.msg, record.args = message, None
            if record.exc_text and token in record.exc_text:
                record.exc_text = record.exc_text.replace(token, "<token>")
        return True


def setup_logging(home: Path, tokens: Callable[[], Iterable[str]]) -> Path:
    """Send every INFO line of the ``kernel_server`` loggers to stderr and to
    ``home/server.log`` (0600), token redacted; and crash tracebacks (``faulthandler``) to the
    same file. ``tokens`` gives the tokens to redact. Returns the log's path."""
    path = private_file(home / "server.log")
    redact = RedactToken(tokens)
    handlers: list[logging.Handler] = [logging.StreamHandler(), logging.FileHandler(path)]
    for handler in handlers:
        handler.addFilter(redact)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    log.setLevel(logging.INFO)
    log.propagate = False  # a root handler user code sets up must not print our lines twice
    for handler in handlers:
        log.addHandler(handler)
    # faulthandler writes straight to the descriptor from its C signal handler: keep one open
    # for the life of the process (it must outlive every Python object that could close it).
    faulthandler.enable(os.open(path, os.O_WRONLY | os.O_APPEND), all_threads=True)
    return path


@dataclass(frozen=True)
class Restarts:
    """What the supervisor said at start: ``count`` restarts so far, the last one after
    ``last_crash`` (``"the server process (pid 123) was killed by SIGKILL"``). An unsupervised
    server, and an app made by ``create_app`` alone, is never restarted: `NO_RESTARTS`."""

    count: int = 0
    last_crash: str | None = None


NO_RESTARTS = Restarts()


def describe_job(job: Any) -> str:
    """``job 3f2a1c7 (cell, session 1a2b3c4d, model gpt2)``: one job, as the log names it."""
    details = [job.kind] + ([f"session {job.session[:8]}"] if job.session else []) + (
        [f"model {job.model}"] if job.model else [])
    return f"job {job.id} ({', '.join(details)})"


class RunMarker:
    """``running-<pid>.json`` in the home while this server runs (see the module's docstring)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = home / f"running-{os.getpid()}.json"
        self._fd: int | None = None
        self._offset = 0

    def report_previous(self) -> None:
        """Log one line for each earlier run on this home that ended without stopping, and
        remove its marker. A marker whose process still lives belongs to another server."""
        for path in sorted(self.home.glob("running-*.json")):
            try:
                info = json.loads(path.read_text())
                pid = int(info["pid"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring %s: it is not a mymps run marker (%s)", path.name, exc)
                continue
            if pid != os.getpid() and _alive(pid):
                continue
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("started", 0))))
            now = str(info.get("now", "")).strip() or "idle"
            doing = "idle" if now == "idle" else f"running {now}"
            how = (f"ended by {now}" if now.startswith("os._exit(") else
                   f"ended without stopping (killed, crashed or os._exit) while {doing}")
            log.warning("the previous run (pid %s, started %s, on %s) %s; a crash's traceback, if any, is above "
                        "in this log. Models come back with --restore; session namespaces are gone",
                        pid, started, info.get("address", "?"), how)
            path.unlink(missing_ok=True)

    def create(self, **info: Any) -> None:
        """Write the marker: ``info`` and an empty "now" field that `set_now` rewrites in place."""
        head = json.dumps({"pid": os.getpid(), "started": time.time(), **info})[:-1] + ', "now": "'
        data = head.encode() + b" " * _ACTIVITY_WIDTH + b'"}\n'
        self._offset = len(head.encode())
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, data)
        self._fd = fd

    def set_now(self, activity: str) -> None:
        """Record what the process does now (``""``: idle); one ``pwrite``, cheap per job."""
        if self._fd is None:
            return
        field = json.dumps(activity)[1:-1].encode()
        if len(field) > _ACTIVITY_WIDTH:  # at most 6 bytes per escaped character: this fits
            field = json.dumps(activity[:_ACTIVITY_WIDTH // 6])[1:-1].encode()
        os.pwrite(self._fd, field.ljust(_ACTIVITY_WIDTH), self._offset)

    def on_running(self, job: Any) -> None:
        """The job queue's hook: a job started (``job``) or ended (``None``)."""
        self.set_now(describe_job(job) if job is not None else "")

    def remove(self) -> None:
        """A clean stop: the marker goes, so the next start reports nothing."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def watch_os_exit(marker: RunMarker, activity: Callable[[], str]) -> None:
    """Make ``os._exit`` in this process (user code calling it) say so in the log and marker.

    ``os._exit`` skips every cleanup, so nothing else could tell. Forked children (a
    ``multiprocessing`` worker) also end with ``os._exit``: only this process's own call is noted.
    """
    real_exit = os._exit
    server_pid = os.getpid()

    def _exit(status: int) -> NoReturn:
        if os.getpid() == server_pid:
            doing = activity()
            marker.set_now(f"os._exit({status}) called" + (f" in {doing}" if doing else ""))
            log.error("os._exit(%s) called%s: the server process ends now", status, f" in {doing}" if doing else "")
            for handler in log.handlers:
                handler.flush()
        real_exit(status)

    os._exit = _exit


class Stopper:
    """SIGTERM / SIGINT -> a graceful stop, forced after :data:`FORCE_AFTER_S` s or a second signal.

    Args:
        graceful: starts the graceful stop (cancel jobs, close connections); runs on its own thread.
        on_force: last words before a forced exit (remove the marker); must not block.
        stuck: says what still runs, for the forced exit's log line.
    """

    def __init__(self, graceful: Callable[[], None], on_force: Callable[[], None], stuck: Callable[[], str]) -> None:
        self.graceful = graceful
        self.on_force = on_force
        self.stuck = stuck
        self.reason: str | None = None
        self.signalled_at = 0.0
        self._done = threading.Event()

    def install(self) -> None:
        """Route SIGTERM and SIGINT to this stopper; call on the main thread."""
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _heard_by_the_stopper)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        threading.Thread(target=self._listen, args=(read_end,), name="mymps-signals", daemon=True).start()

    def _listen(self, read_end: int) -> None:
        wanted = {int(signal.SIGTERM), int(signal.SIGINT)}
        while True:
            for signum in os.read(read_end, 64):
                if signum in wanted:
                    self.stop(signal.Signals(signum).name)

    def stop(self, reason: str) -> None:
        """Begin the stop; a second call while stopping forces the exit at once."""
        if self.reason is not None:
            self.force(f"a second {reason} came while stopping")
        self.reason, self.signalled_at = reason, time.monotonic()
        log.info("shutting down (%s)", reason)
        threading.Thread(target=self.graceful, name="mymps-shutdown", daemon=True).start()
        threading.Thread(target=self._deadline, name="mymps-stop-deadline", daemon=True).start()

    def finished(self) -> None:
        """The server has stopped cleanly: the forced exit is called off (a clean stop that took
        most of :data:`FORCE_AFTER_S` must not end as a forced one during interpreter teardown).

        Threads user code started and left running (not daemons) would keep the interpreter
        waiting for them at exit, for ever: the process ends now without them, with status 0
        (the stop itself was clean), after one line naming them.
        """
        self._done.set()
        others = user_threads()
        if others:
            log.info("ending without waiting for threads user code started: %s", ", ".join(others))
            for handler in log.handlers:
                handler.flush()
            sys.stdout.flush()
            sys.stderr.flush()
            _real_exit(0)

    def _deadline(self) -> None:
        if not self._done.wait(FORCE_AFTER_S):
            self.force(f"it did not stop within {FORCE_AFTER_S:g} s")

    def force(self, why: str) -> NoReturn:
        """Log why and what is stuck, remove the marker, and end the process now."""
        log.error("stopped (%s): forcing the exit because %s (%s)", self.reason, why, self.stuck())
        self.on_force()
        for handler in log.handlers:
            handler.flush()
        sys.stderr.flush()
        _real_exit(FORCED_EXIT_STATUS)


def user_threads() -> list[str]:
    """Names of the live threads that would keep the interpreter from exiting (not daemons, not
    the main thread): after the HTTP server's has ended, only user code starts such threads."""
    skip = (threading.main_thread(), threading.current_thread())
    return [t.name for t in threading.enumerate() if not t.daemon and t not in skip]


def _heard_by_the_stopper(signum: int, frame: object) -> None:
    """The Python-level handler: nothing to do, the wakeup fd has told the stopper's thread.
    (Installing it keeps the default action, which would end the process, from happening.)"""
