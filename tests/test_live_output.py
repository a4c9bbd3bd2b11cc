"""Remote cells print as local ones do (issue 12, items 3 and 5): partial lines show while the
cell runs, whole lines arrive in one piece, and a cell queued behind another session's job says
in one line which job it waits for.

Every test talks to the real shared ``server`` through real `Client`s; what the client renders
goes to `Recorder`, an `OutputSink` that records the stream text in the pieces it came in.
Cells that must wait for the test poll for a file the test creates, so nothing depends on
timing: the test releases the cell only once it has seen what it checks for.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from kit import ServerProcess
from mymps_magic import Client
from mymps_magic.display import OutputSink

# How long a test waits for something that should take milliseconds before it fails.
PATIENCE_S = 10.0


class Recorder(OutputSink):
    """Records stream pieces as they come; draws nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.pieces: list[tuple[str, str]] = []
        self._changed = threading.Condition()

    def stream(self, name: str, text: str, request: int = 0) -> None:
        with self._changed:
            self.pieces.append((name, text))
            self._changed.notify_all()

    def finish(self, request: int) -> None:
        pass

    def text(self, name: str) -> str:
        with self._changed:
            return "".join(text for stream, text in self.pieces if stream == name)

    def wait_for(self, name: str, needle: str) -> str:
        """The text of stream ``name`` once it contains ``needle``; fails after `PATIENCE_S`."""
        deadline = time.monotonic() + PATIENCE_S
        with self._changed:
            while needle not in (seen := "".join(t for s, t in self.pieces if s == name)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{needle!r} never arrived on {name}; so far: {seen!r}")
                self._changed.wait(left)
            return seen


@pytest.fixture
def make_client(server: ServerProcess) -> Iterator[Callable[[], tuple[Client, Recorder]]]:
    """Clients (a session each) on the shared server, their output recorded; closed afterwards."""
    made: list[Client] = []

    def make() -> tuple[Client, Recorder]:
        client = Client(host="127.0.0.1", port=server.port, token=server.token)
        recorder = Recorder()
        client.session.sink = recorder
        made.append(client)
        return client, recorder

    yield make
    for client in made:
        client.close()


@pytest.fixture
def go(make_client: Callable[[], tuple[Client, Recorder]], tmp_path: Path) -> Iterator[Path]:
    """The file a waiting cell polls for; created at the latest when the test ends (before its
    clients close), so a failed test never leaves the shared server's device held."""
    path = tmp_path / "go"
    yield path
    path.touch()


def wait_for_file(path: Path) -> str:
    """Cell source that waits (at most a minute) until the test creates ``path``."""
    return (f"import os, time\n_deadline = time.monotonic() + 60\n"
            f"while not os.path.exists({str(path)!r}) and time.monotonic() < _deadline:\n"
            "    time.sleep(0.01)\n")


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    return thread, result


def test_a_partial_line_shows_while_the_cell_still_runs(
    make_client: Callable[[], tuple[Client, Recorder]], go: Path
) -> None:
    client, out = make_client()
    source = "print('.', end='')\n" + wait_for_file(go) + "print('.', end='')\nprint(' done')\n'finished'"
    thread, result = in_thread(lambda: client.run_cell(source))
    assert out.wait_for("stdout", ".") == "."  # the dot came while the cell waits for the file
    go.touch()
    thread.join(PATIENCE_S)
    assert result == ["finished"]
    assert out.text("stdout") == ".. done\n"


def test_a_line_written_in_two_writes_arrives_in_one_piece(make_client: Callable[[], tuple[Client, Recorder]]) -> None:
    client, out = make_client()
    client.run_cell("import sys\nsys.stdout.write('one '); sys.stdout.write('line\\n')\n"
                    "for i in range(200): print(i, end=' ')\nprint()")
    pieces = [text for name, text in out.pieces if name == "stdout"]
    assert "".join(pieces) == "one line\n" + " ".join(map(str, range(200))) + " \n"
    assert not [piece for piece in pieces if piece.endswith("one ")], f"the line was cut: {pieces}"
    assert len(pieces) < 20, f"a fast loop's partial lines are batched, not sent a write each: {len(pieces)}"


@pytest.mark.slow
def test_lines_that_complete_within_the_interval_are_never_cut(
    make_client: Callable[[], tuple[Client, Recorder]]
) -> None:
    """Lines written in two pieces 20 ms apart, for 1.5 s: the partial-line timer fires many
    times meanwhile, and must never send a line without its end (each line completes well
    within the 0.2 s a partial line may wait)."""
    client, out = make_client()
    lines = client.run_cell("import sys, time\n_n, _end = 0, time.monotonic() + 1.5\n"
                            "while time.monotonic() < _end:\n"
                            "    sys.stdout.write('first half, '); time.sleep(0.02); print('second half'); _n += 1\n"
                            "_n")
    pieces = [text for name, text in out.pieces if name == "stdout"]
    assert "".join(pieces) == "first half, second half\n" * lines
    assert [piece for piece in pieces if not piece.endswith("\n")] == [], f"{len(pieces)} pieces"


def test_a_call_queued_behind_another_sessions_job_says_which_job_it_waits_for(
    make_client: Callable[[], tuple[Client, Recorder]], go: Path
) -> None:
    holder, holder_out = make_client()
    waiter, waiter_out = make_client()
    holding, held = in_thread(lambda: holder.run_cell("print('holding')\n" + wait_for_file(go) + "'released'"))
    holder_out.wait_for("stdout", "holding")
    running = [job for job in holder.jobs() if job["session"] == holder.session.session_id]
    assert len(running) == 1 and running[0]["state"] == "running", running

    waiting, waited = in_thread(lambda: waiter.run_cell("print('ran')\n'second'"))
    notice = waiter_out.wait_for("stderr", "\n")
    assert waiter_out.text("stdout") == "", "the cell ran while the other session held the device"
    assert notice.count("\n") == 1, notice
    assert re.search(rf"\bjob {running[0]['id']}\b", notice), notice
    assert "cell" in notice and f"session {holder.session.session_id[:8]}" in notice, notice

    go.touch()
    holding.join(PATIENCE_S)
    waiting.join(PATIENCE_S)
    assert held == ["released"] and waited == ["second"]
    assert waiter_out.text("stdout") == "ran\n"
    assert holder_out.text("stderr") == "", "the cell that started at once said nothing of waiting"


def test_a_call_behind_its_own_sessions_job_says_nothing(make_client: Callable[[], tuple[Client, Recorder]]) -> None:
    client, out = make_client()
    first = client.submit(time.sleep, 0.5)
    assert client.run_cell("2") == 2
    assert first.done()
    assert out.text("stderr") == ""
