"""Faults of the notebook channel under real use (issue 10, items 1-4, 10 and 14's session lines).

Each test drives ``/ws/session`` at the wire level through `RawSession` (a client built from
``wire.py`` and a plain ``websockets`` connection) against the real server, and checks what a
user would: every line arrives, memory stays bounded, a taken-over connection is told why, a
bad request id gets an answer that names it, and another client's ``/health`` keeps answering.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any, Callable

import httpx
import psutil
import pytest
from websockets.exceptions import ConnectionClosed

from kit import MakeServer, ServerProcess, auth
from mymps_magic import wire
from test_session_bad_input import RawSession, assert_healthy, raw_header

MiB = 1 << 20


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it is truthy (its value is returned), or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)


def jobs(server: ServerProcess) -> list[dict[str, Any]]:
    answer = httpx.get(f"{server.url}/jobs", headers=auth(server.token), trust_env=False, timeout=30)
    return answer.json()["jobs"]  # type: ignore[no-any-return]


def rss(server: ServerProcess) -> int:
    assert server.process is not None
    return int(psutil.Process(server.process.pid).memory_info().rss)


class HealthProbe:
    """Another client asking ``GET /health`` over and over in a thread; ``worst`` is the
    longest it waited for an answer."""

    def __init__(self, server: ServerProcess) -> None:
        self.url = f"{server.url}/health"
        self.worst = 0.0
        self.answers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(trust_env=False, timeout=120) as http:
            while not self._stop.is_set():
                started = time.monotonic()
                assert http.get(self.url).status_code == 200
                self.worst = max(self.worst, time.monotonic() - started)
                self.answers += 1
                self._stop.wait(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(130)


def read_until_answer(raw: RawSession, rid: int, timeout: float = 60.0) -> tuple[str, wire.Frame]:
    """Every stream text of request ``rid`` until its answer; returns the text and the answer."""
    text: list[str] = []
    while True:
        frame = raw.receive(timeout)
        if frame.id != rid:
            continue
        if frame.type == "stream":
            text.append(frame["text"])
        elif frame.type in ("result", "error"):
            return "".join(text), frame


# --- item 1: a large backlog ---------------------------------------------------------------------


@pytest.mark.slow
def test_a_large_backlog_is_replayed_whole_while_health_answers(make_server: MakeServer) -> None:
    """80,000 lines printed while the client was away: the resumed client gets every one, and
    the replay never holds the event loop (it took 34 s of a frozen server before)."""
    server = make_server()
    lines = 80_000
    with RawSession(server) as raw:
        session_id = raw.hello()["session"]
        raw.send(wire.Frame("cell", 1, {"source": f"for i in range({lines}):\n    print(f'{{i:08d}}' + 'x' * 91)\n'done'"}))
        wait_for(lambda: jobs(server), 30, "the cell started")
    wait_for(lambda: not jobs(server), 120, "the cell ended")

    probe = HealthProbe(server)
    try:
        with RawSession(server) as raw:
            assert raw.hello(session=session_id)["resumed"] is True
            text, answer = read_until_answer(raw, 1)
    finally:
        probe.stop()
    assert answer.type == "result" and wire.loads(answer.buffers) == "done"
    assert text.splitlines() == [f"{i:08d}" + "x" * 91 for i in range(lines)]
    assert probe.answers > 0
    assert probe.worst < 5.0, f"/health waited {probe.worst:.1f} s during the replay"


# --- item 2: what a session keeps for a client that does not read -------------------------------


@pytest.mark.slow
def test_output_a_client_does_not_read_is_bounded_and_the_client_is_told(make_server: MakeServer) -> None:
    """A client that keeps its socket open but neither reads nor acknowledges, while a cell
    prints 200 MB: the server's memory stays bounded, and once the client reads it gets one line
    saying how much was dropped, then the cell's result."""
    server = make_server(session_buffer="4MiB")
    lines = 200_000
    baseline = rss(server)
    peak = [baseline]
    with RawSession(server) as raw:  # its reader stops taking from the socket when its queue is full
        raw.hello()
        raw.send(wire.Frame("cell", 1, {"source": f"for i in range({lines}):\n    print('y' * 999)\n'finished'"}))
        wait_for(lambda: jobs(server), 30, "the cell started")

        def ended() -> bool:
            peak[0] = max(peak[0], rss(server))
            return not jobs(server)

        wait_for(ended, 300, "the cell ended")
        assert peak[0] - baseline < 100 * MiB, f"the server grew by {(peak[0] - baseline) / MiB:.0f} MiB"

        text, answer = read_until_answer(raw, 1)
    assert answer.type == "result" and wire.loads(answer.buffers) == "finished"
    notices = re.findall(r"\[mymps: ([\d,]+) lines \(([\d.]+ [KMG]iB)\) of output dropped: the client was not reading\]",
                         text)
    assert len(notices) == 1, text[-500:]
    dropped = int(notices[0][0].replace(",", ""))
    kept = text.count("y" * 999 + "\n")
    assert dropped > 0 and kept + dropped == lines
    assert text.endswith("the client was not reading]\n")  # where the output would have been: last


@pytest.mark.slow
def test_a_reaped_session_frees_its_memory(make_server: MakeServer) -> None:
    server = make_server(session_idle=1)
    baseline = rss(server)
    with RawSession(server) as raw:
        raw.hello()
        # A function defined in the namespace refers to it: a cycle only the collector would free.
        source = "big = np.ones(50 * 2**20)\ndef size():\n    return big.nbytes\nsize()"
        assert raw.value("cell", {"source": source}) == 400 * MiB
        assert rss(server) - baseline > 300 * MiB
    wait_for(lambda: rss(server) - baseline < 100 * MiB, 30, "the reaped session's 400 MiB freed")
    log = (server.home / "server.log").read_text()
    assert re.search(r"session \w{8} reaped after \d+ s disconnected", log), log[-2000:]
    assert server.token not in log


# --- item 3: two connections to one session ------------------------------------------------------


def test_a_second_attach_takes_the_session_over_and_answers_never_cross(server: ServerProcess) -> None:
    with RawSession(server) as first:
        session_id = first.hello()["session"]
        first.send(wire.Frame("cell", 1, {"source": "import time\ntime.sleep(3)\n'first'"}))
        wait_for(lambda: any(j["state"] == "running" for j in jobs(server)), 30, "the first cell running")
        with RawSession(server) as second:
            welcome = second.hello(session=session_id)
            assert welcome["resumed"] is True and welcome["last_request"] == 1
            # The old connection is told, in one line, and nothing more reaches it.
            code, reason = first.close_reason()
            assert code == wire.CLOSE_TAKEN_OVER
            assert reason == "the session was taken over by another connection"
            # Reusing the first client's id is an error that names it, not the first's answer.
            second.send(wire.Frame("cell", 1, {"source": "'second, reused id'"}))
            reused = second.answer(1)
            assert reused.type == "error" and reused["code"] == "bad_request"
            assert "request id 1 " in reused["evalue"]
            # Its own requests, numbered after the welcome, get their own answers.
            assert second.value("cell", {"source": "'second'"}) == "second"
    with RawSession(server) as third:
        third.hello(session=session_id)
        assert third.value("cell", {"source": "_"}) == "second"  # the session went on


def test_session_lines_in_the_server_log(make_server: MakeServer) -> None:
    server = make_server()
    with RawSession(server) as raw:
        session_id = raw.hello()["session"]
    with RawSession(server) as raw:
        raw.hello(session=session_id)
        with RawSession(server) as other:
            other.hello(session=session_id)
    short = session_id[:8]
    log_path = server.home / "server.log"
    for line in ("opened", "disconnected", "resumed", "taken over"):
        wait_for(lambda: f"session {short} {line}" in log_path.read_text(), 10, f"the log line 'session {short} {line}'")
    assert server.token not in log_path.read_text() and session_id not in log_path.read_text()


# --- item 4: request ids -------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", [3, 2, 2**63, 2**64 - 1, -1, -(2**63)],
                         ids=["repeated", "lower", "2**63", "2**64-1", "-1", "-2**63"])
def test_a_bad_request_id_gets_an_error_naming_it_and_later_requests_run(server: ServerProcess, bad_id: int) -> None:
    with RawSession(server) as raw:
        raw.hello()
        for rid in (1, 2, 3):
            raw.send(wire.Frame("cell", rid, {"source": f"{rid} * 10"}))
            assert wire.loads(raw.answer(rid).buffers) == rid * 10
        raw.send(wire.Frame("cell", bad_id, {"source": "'must not run'"}))
        answer = raw.answer(bad_id)
        assert answer.type == "error" and answer["code"] == "bad_request"
        assert f"request id {bad_id} " in answer["evalue"] and "\n" not in answer["evalue"]
        for rid in (4, 5):
            raw.send(wire.Frame("cell", rid, {"source": f"{rid} * 10"}))
            assert wire.loads(raw.answer(rid).buffers) == rid * 10


# --- item 10: the hello --------------------------------------------------------------------------


def test_a_frame_listing_millions_of_buffers_is_refused_without_growing(make_server: MakeServer) -> None:
    server = make_server()
    baseline = rss(server)
    header = raw_header({"v": wire.PROTOCOL_VERSION, "t": "hello", "id": 0, "bufs": [0] * 4_000_000})
    with RawSession(server) as raw:
        raw.ws.send(header)
        code, reason = raw.close_reason()
    assert code == 1003 and f"{wire.MAX_BUFFERS:,}" in reason
    assert rss(server) - baseline < 100 * MiB
    assert_healthy(server)


def test_a_frame_may_list_many_buffers() -> None:
    """A legitimate push of a dict of thousands of arrays still decodes."""
    import numpy as np

    values = {f"a{i}": np.full(3, i, dtype=np.int32) for i in range(5000)}
    frame = wire.Frame("push", 1, {}, wire.dumps(values))
    decoded = wire.FrameDecoder().feed(b"".join(bytes(m) for m in wire.encode_frame(frame)))
    assert decoded is not None and wire.loads(decoded.buffers)["a4999"].tolist() == [4999] * 3
    too_many = raw_header({"v": wire.PROTOCOL_VERSION, "t": "push", "id": 1, "bufs": [0] * (wire.MAX_BUFFERS + 1)})
    with pytest.raises(wire.WireFormatError, match="over the limit"):
        wire.FrameDecoder().feed(too_many)


@pytest.mark.slow
def test_a_hello_whose_data_never_comes_is_closed_with_a_reason(server: ServerProcess) -> None:
    """A chunked hello announces 10 bytes that never arrive: closed after the hello timeout."""
    with RawSession(server) as raw:
        raw.ws.send(raw_header({"v": wire.PROTOCOL_VERSION, "t": "hello", "id": 0, "bufs": [10], "chunked": True}))
        started = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            raw.ws.recv(timeout=60)
    assert time.monotonic() - started < 50
    received = closed.value.rcvd
    assert received is not None and received.code == 1008 and "hello" in received.reason
    assert_healthy(server)
