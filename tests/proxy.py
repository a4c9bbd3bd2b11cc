"""A loopback TCP proxy that cuts connections, as a dropped SSH tunnel does.

The fault tests and ``benchmarks/load.py`` put it between a client and the real server: `sever`
cuts every connection through it at once, `refusing` turns new connections away for a while (the
tunnel still down), and `cutting` severs every few seconds on a thread of its own, for as long
as a block runs. Only sockets are involved: the client and the server are the real ones.
`in_background` runs the call that a cut should interrupt.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

__all__ = ["Proxy", "in_background"]


class Proxy:
    """A loopback TCP proxy to ``127.0.0.1:target_port``.

    Each accepted connection is piped both ways to a new connection to the target by two
    threads. `sever` closes every current connection and keeps accepting new ones; while
    `refusing` is set, new connections are accepted and closed at once.

    Attributes:
        port: where clients connect.
        accepted: how many connections it has piped so far.
        severs: how many times `sever` has cut connections.
        refused: how many connections it closed at once while `refusing`.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.accepted = 0
        self.severs = 0
        self.refused = 0
        self.refusing = threading.Event()
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_forever, name="proxy-accept", daemon=True)
        self._thread.start()

    def _accept_forever(self) -> None:
        while not self._closed:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing.is_set():
                downstream.close()
                self.refused += 1
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                downstream.close()
                continue
            upstream.settimeout(None)
            for sock in (downstream, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._open += [downstream, upstream]
                self.accepted += 1
            for src, dst in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pipe, args=(src, dst), name="proxy-pipe", daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:  # a connection that ended by itself is not kept until the next sever
                for sock in (src, dst):
                    if sock in self._open:
                        self._open.remove(sock)
                        sock.close()

    def sever(self) -> None:
        """Cut every connection through the proxy now; new ones are still accepted."""
        with self._lock:
            socks, self._open = self._open, []
            self.severs += 1
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    @contextlib.contextmanager
    def cutting(self, every: tuple[float, float], seed: int = 0) -> Iterator[None]:
        """Sever every ``every`` seconds (a random pause between the two bounds) while the block runs.

        Args:
            every: the shortest and longest pause between two cuts.
            seed: makes the pauses repeatable.
        """
        stop = threading.Event()
        rng = random.Random(seed)

        def cut() -> None:
            while not stop.wait(rng.uniform(*every)):
                self.sever()

        thread = threading.Thread(target=cut, name="proxy-cutter", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):  # wakes the blocked accept: a close alone leaves it listening
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.sever()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def in_background(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn()`` in a thread; the list gets its value or the exception it raised."""
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out
