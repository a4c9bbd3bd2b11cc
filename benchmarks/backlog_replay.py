"""A session's output backlog replayed after a reconnect, against the same output sent live.

A notebook whose tunnel drops while a cell prints gets what it missed when it reconnects. Before
issue 10 the server merged that backlog in quadratic time on its event loop (80,000 lines of 100
characters: 34 s, with every other client's ``/health`` waiting as long). Here a cell prints
``N`` lines of 100 characters, once to a connected client (the baseline: the same bytes sent
live) and once while the client is away; the client then resumes and reads everything. Another
client calls ``/health`` all along; its worst wait is the figure that shows the event loop free.
Run: ``.venv/bin/python benchmarks/backlog_replay.py [--lines 20000 40000 80000]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import QUIET_ENV, ServerProcess
from _machine import machine_line

os.environ.update(QUIET_ENV)

from mymps_magic import wire  # noqa: E402


class Session:
    """A bare ``/ws/session`` client: hello, one cell, read its stream until the answer."""

    def __init__(self, server: ServerProcess, session: str | None = None) -> None:
        from websockets.sync.client import connect

        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(connect(
            server.ws_url("/ws/session"), additional_headers={"Authorization": f"Bearer {server.token}"},
            proxy=None, max_size=None, ping_interval=None))
        self.decoder = wire.FrameDecoder()
        self.send(wire.Frame("hello", 0, {"session": session, "last_seq": 0, "python": wire.PYTHON_VERSION,
                                          "cloudpickle": wire.cloudpickle_version(),
                                          "protocol": wire.PROTOCOL_VERSION}))
        self.welcome = self.receive()

    def send(self, frame: wire.Frame) -> None:
        for message in wire.encode_frame(frame):
            self.ws.send(bytes(message))

    def receive(self) -> wire.Frame:
        while True:
            frame = self.decoder.feed(self.ws.recv(timeout=600))  # type: ignore[arg-type]
            if frame is not None:
                return frame

    def read_answer(self, rid: int) -> int:
        """Read until request ``rid`` ends; returns how many characters of output came."""
        chars = 0
        while True:
            frame = self.receive()
            if frame.id == rid and frame.type == "stream":
                chars += len(frame["text"])
            elif frame.id == rid and frame.type in ("result", "error"):
                return chars

    def close(self) -> None:
        self._stack.close()


_PROBE = """
import sys, time, httpx
worst = 0.0
with httpx.Client(trust_env=False, timeout=600) as http:
    print("ready", flush=True)
    while not sys.stdin.readline().strip():
        start = time.perf_counter()
        http.get(sys.argv[1]).raise_for_status()
        worst = max(worst, time.perf_counter() - start)
        print(flush=True)
print(worst, flush=True)
"""


class HealthProbe:
    """Another client, in a process of its own (so this one's reading does not slow it),
    asking ``/health`` in a loop; :meth:`stop` returns its longest wait."""

    def __init__(self, server: ServerProcess) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", _PROBE, f"{server.url}/health"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdout.readline()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pace, daemon=True)
        self._thread.start()

    def _pace(self) -> None:
        """One go-ahead per answer, every 10 ms: the probe asks 100 times a second at most."""
        assert self.process.stdin is not None and self.process.stdout is not None
        while not self._stop.wait(0.01):
            self.process.stdin.write("\n")
            self.process.stdin.flush()
            self.process.stdout.readline()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        out, _ = self.process.communicate("stop\n")
        return float(out.split()[-1])


def cell(lines: int) -> str:
    return f"for i in range({lines}):\n    print(f'{{i:08d}}' + 'x' * 91)\n'done'"


def jobs(server: ServerProcess) -> list[Any]:
    import httpx

    answer = httpx.get(f"{server.url}/jobs", headers={"Authorization": f"Bearer {server.token}"}, trust_env=False)
    return list(answer.json()["jobs"])


def measure(server: ServerProcess, lines: int) -> dict[str, float]:
    live = Session(server)
    probe = HealthProbe(server)
    start = time.perf_counter()
    live.send(wire.Frame("cell", 1, {"source": cell(lines)}))
    got = live.read_answer(1)
    live_s = time.perf_counter() - start
    live_health = probe.stop()
    live.close()
    assert got == lines * 100, got

    away = Session(server)
    session_id = away.welcome["session"]
    away.send(wire.Frame("cell", 1, {"source": cell(lines)}))
    while not jobs(server):
        time.sleep(0.01)
    away.close()
    while jobs(server):
        time.sleep(0.05)
    probe = HealthProbe(server)
    start = time.perf_counter()
    back = Session(server, session_id)
    got = back.read_answer(1)
    replay_s = time.perf_counter() - start
    replay_health = probe.stop()
    back.close()
    assert back.welcome["resumed"] and got == lines * 100, got
    return {"live_s": live_s, "live_health": live_health, "replay_s": replay_s, "replay_health": replay_health}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, nargs="+", default=[20_000, 40_000, 80_000])
    args = parser.parse_args()
    print(machine_line())
    print(f"{'lines':>8} | {'live: all output':>16} | {'/health worst':>13} | {'replayed after resume':>21} | "
          f"{'/health worst':>13}")
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(Path(tmp) / "home") as server:
        probe = HealthProbe(server)
        time.sleep(1.0)  # a second of asking an idle server: the baseline of the /health columns
        print(f"{'idle':>8} | {'':>16} | {probe.stop() * 1e3:>10.1f} ms |")
        for lines in args.lines:
            r = measure(server, lines)
            print(f"{lines:>8,} | {r['live_s']:>14.2f} s | {r['live_health'] * 1e3:>10.1f} ms | "
                  f"{r['replay_s']:>19.2f} s | {r['replay_health'] * 1e3:>10.1f} ms", flush=True)
    print("target (issue 10, item 1): the replay grows linearly with the backlog, and /health never "
          "waits more than a few ms behind it")


if __name__ == "__main__":
    main()
