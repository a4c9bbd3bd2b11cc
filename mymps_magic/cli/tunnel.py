"""`mymps tunnel`: the SSH tunnel that makes the remote server's port a local one, kept up.

The tunnel is OpenSSH's own ``ssh -L`` run as a child process; mymps adds what a bare forward
lacks: it fetches the server's token over ssh, checks ``/health`` through the forward, restarts
ssh with backoff when it exits or stops answering, and stops cleanly on Ctrl-C or SIGTERM.

Why not ``ssh -N``: sshd sets ``TCP_NODELAY`` on its connection only when a session starts, and
``-N`` starts none, so Nagle's algorithm holds back every answer the server writes in two pieces
until the client's delayed ACK: about 40 ms per small HTTP call. So the tunnel runs a remote
command that only waits, in a terminal (``RequestTTY=force``): any session turns Nagle off, and a
terminal makes it an interactive one at both ends, which also marks the packets with OpenSSH's
interactive IPQoS class rather than the bulk one (CS1 from OpenSSH 7.8 to 9.x, which Wi-Fi
queues as background traffic). A call then costs a fraction of a millisecond more than on
loopback (``benchmarks/tunnel_latency.py``). The terminal's hangup ends the remote command when
the connection ends.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import IO, NoReturn

from mymps_magic import errors
from mymps_magic.cli.tunnelcheck import PROBE_TIMEOUT_S, describe, health, say
from mymps_magic.cli.tunnelsettings import LOCAL_HOST, TunnelSettings
from mymps_magic.errors import CommandError

# The tunnel's own ssh. The terminal turns Nagle off (see the module docstring); no shared
# ControlMaster connection, so that killing this ssh really drops the forward and a new one is
# really new; keep-alives notice a dead link within 45 s.
TUNNEL_OPTIONS = (
    "-o", "RequestTTY=force",
    "-o", "ExitOnForwardFailure=yes",
    "-o", "ServerAliveInterval=15",
    "-o", "ServerAliveCountMax=3",
    "-o", "ControlMaster=no",
    "-o", "ControlPath=none",
)
# Waits until the connection ends (the terminal's hangup ends it); any large number of seconds
# that GNU and BSD sleep both take will do.
WAIT_FOREVER = "exec sleep 2147483647"

PROBE_INTERVAL_S = 5.0
READY_TIMEOUT_S = 30.0
BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0)


class _Stopped(BaseException):
    """Ctrl-C, SIGTERM or a closed terminal (SIGHUP): a BaseException, so that no
    ``except Exception`` on the way swallows it."""


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    def stop(signum: int, frame: FrameType | None) -> None:
        raise _Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Tunnel:
    """One kept-up tunnel: the ssh child process, its last words, and the loop that restarts it.

    Args:
        settings: where the tunnel goes and where the token lands.
    """

    def __init__(self, settings: TunnelSettings) -> None:
        self.settings = settings
        self.process: subprocess.Popen[bytes] | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=5)

    # -- the command -----------------------------------------------------------------------------

    def run(self) -> int:
        """Fetch the token, open the tunnel and keep it up until Ctrl-C or SIGTERM.

        Returns:
            0 when stopped by a signal, 1 when the first connection fails (the reason printed).
        """
        with _stop_on_signals():
            try:
                self._ensure_port_free()
                self.fetch_token()
                self._start()
                self._keep_up(server_up=self._report_up(first=True))
            except CommandError as exc:
                print(f"mymps tunnel: {exc}", file=sys.stderr, flush=True)
                return 1
            except _Stopped:
                say("stopped.")
                return 0
            finally:
                self._stop_ssh()

    def fetch_token(self) -> None:
        """Copy the server's token over ssh into the local token file (mode 0600).

        A remote without a token file (its server not started yet, or run with ``MYMPS_TOKEN``)
        is reported in one line and the local file is left as it is.

        Raises:
            CommandError: ssh itself failed (host, user or key wrong).
        """
        s = self.settings
        remote = "sh -c " + shlex.quote(f"cat -- {s.remote_token}")
        try:
            done = s.ssh.run(remote, timeout=60)
        except subprocess.TimeoutExpired:
            raise CommandError(f"ssh to {s.ssh.destination} did not finish in 60 s; is the host up?") from None
        if done.returncode == 255:
            raise CommandError(f"cannot ssh to {s.ssh.destination} ({_last_line(done.stderr)}); "
                              f"check the host, user, port (-p) and key (-i) with: {shlex.join(s.ssh.command())}")
        token = done.stdout.decode(errors="replace").strip()
        if done.returncode != 0 or not token:
            where = f"{s.remote_home}/token" if s.remote_home else "~/.mymps/token (or $MYMPS_HOME/token)"
            say(f"no token at {s.ssh.destination}:{where} ({_last_line(done.stderr) or 'empty'}); start the server "
                "there once, or give --remote-home; the local token file is unchanged.")
            return
        write_token(s.token_file, token)

    # -- ssh -------------------------------------------------------------------------------------

    def _ensure_port_free(self) -> None:
        with socket.socket() as sock:
            try:
                sock.bind((LOCAL_HOST, self.settings.local_port))
            except OSError:
                raise CommandError(f"{self.settings.local_address} is already in use (another `mymps tunnel`?); "
                                  "stop that one or pick --local-port.") from None

    def _start(self) -> None:
        """Start ssh and wait until its forward accepts connections.

        Raises:
            CommandError: ssh exited first, or the forward did not open in time.
        """
        s = self.settings
        forward = f"{LOCAL_HOST}:{s.local_port}:127.0.0.1:{s.remote_port}"
        self._stderr.clear()
        self.process = subprocess.Popen(
            s.ssh.command(*TUNNEL_OPTIONS, "-L", forward, remote=WAIT_FOREVER),
            stdin=subprocess.DEVNULL,  # never the user's terminal: a forced tty would make it raw
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert self.process.stderr is not None
        threading.Thread(target=self._drain, args=(self.process.stderr,), daemon=True).start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _accepts(s.local_port):
            if self.process.poll() is not None:
                raise CommandError(f"ssh to {s.ssh.destination} {_exit_status(self.process.returncode)}"
                                   f"{self.last_words()}.")
            if time.monotonic() > deadline:
                raise CommandError(f"the forward to {s.remote_address} did not open within {READY_TIMEOUT_S:g} s.")
            time.sleep(0.01)

    def _drain(self, stream: IO[bytes]) -> None:
        for line in stream:
            text = line.decode(errors="replace").strip()
            if text:
                self._stderr.append(text)

    def last_words(self) -> str:
        """`` (ssh's last line on stderr)``, which says why it stopped; ``""`` when it said nothing."""
        return f" ({self._stderr[-1]})" if self._stderr else ""

    def _stop_ssh(self, *, hung: bool = False) -> None:
        """End ssh: SIGTERM lets it close the connection; a hung one is killed at once."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        if hung:
            process.kill()
        else:
            process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    # -- keeping it up ---------------------------------------------------------------------------

    def _keep_up(self, *, server_up: bool) -> NoReturn:
        """Watch ssh and probe ``/health`` every few seconds, until a signal ends the command."""
        server_down = not server_up
        while True:
            assert self.process is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(PROBE_INTERVAL_S)
            if self.process.poll() is not None:
                self._reconnect(f"ssh {_exit_status(self.process.returncode)}{self.last_words()}")
                continue
            try:
                health(self.settings.local_port)
            except errors.TimeoutError:
                self._stop_ssh(hung=True)
                self._reconnect(f"no answer through the tunnel within {PROBE_TIMEOUT_S:g} s")
            except errors.MympsError:
                if not server_down:
                    say(f"the tunnel is up but no mymps server answers at {self.settings.remote_address}; "
                        "start it there (`mymps serve`). Waiting.")
                server_down = True
            else:
                if server_down:
                    self._report_up(first=False)
                server_down = False

    def _reconnect(self, reason: str) -> None:
        """Restart ssh with backoff until the forward is open again, and say so in one line."""
        self._stop_ssh()
        lost = time.monotonic()
        for attempt in itertools.count(1):
            time.sleep(BACKOFF_S[min(attempt - 1, len(BACKOFF_S) - 1)])
            try:
                self._start()
                self.fetch_token()  # it may have been rotated meanwhile (`mymps token rotate`)
            except CommandError as exc:
                self._stop_ssh()
                if attempt == 1:
                    say(f"{reason}; reconnecting failed ({exc}); retrying with backoff up to {BACKOFF_S[-1]:g} s.")
                continue
            say(f"{reason}; reconnected in {time.monotonic() - lost:.2f} s.")
            return

    def _report_up(self, *, first: bool) -> bool:
        """Say in one line that the tunnel is up, with the server and device; False if no server."""
        s = self.settings
        try:
            answer = health(s.local_port)
        except errors.MympsError:
            say(f"{s.local_address} -> {s.remote_address} is open, but no mymps server answers there yet; "
                "start it (`mymps serve`). Ctrl-C stops the tunnel.")
            return False
        ending = f"; token in {s.token_file}. Ctrl-C stops it." if first else "."
        say(f"{s.local_address} -> {s.remote_address} up: {describe(answer)}{ending}")
        return True


def write_token(path: Path, token: str) -> None:
    """Write the token readable by its owner only (0600), atomically, in a 0700 directory if new."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)
    os.replace(partial, path)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((LOCAL_HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


def _exit_status(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


def _last_line(stderr: bytes) -> str:
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""
