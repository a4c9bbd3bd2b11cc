"""Faults of the notebook channel under real use (issue 10, items 1-4, 10 and 14's session lines).

Each test drives ``/ws/session`` at the wire level through `RawSession` (a client built from
the ``wire`` package and a plain ``websockets`` connection) against the real server, and checks what a
user would: every line arrives, memory stays bounded, a taken-over connection is told why, a
bad request id gets an answer that names it, and another client's ``/health`` keeps answering.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np
import psutil
import pytest
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

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
    # The session's memory goes at its close, a moment before the reap's log line is written.
    reaped = re.compile(r"session \w{8} reaped after \d+ s disconnected")
    wait_for(lambda: reaped.search((server.home / "server.log").read_text()), 30, "the session reaped")
    wait_for(lambda: rss(server) - baseline < 100 * MiB, 30, "the reaped session's 400 MiB freed")
    log = (server.home / "server.log").read_text()
    assert server.token not in log


# --- item 3: two connections to one session ------------------------------------------------------


def test_a_second_attach_takes_the_session_over_and_its_new_socket_gets_the_replay(
        server: ServerProcess, tmp_path: Path) -> None:
    """The old connection is told why (4001 and one line) and gets nothing more; the new one is
    sent everything past its hello's ``last_seq``, the first connection's answers included (the
    session's frames go to whichever socket holds it), and a reused request id is an error that
    names it. The first cell waits for a file the test creates once its assertions are done."""
    release = tmp_path / "release"
    with RawSession(server) as first:
        session_id = first.hello()["session"]
        first.send(wire.Frame("cell", 1, {"source": f"import os, time\nwhile not os.path.exists({str(release)!r}):\n"
                                                   "    time.sleep(0.02)\n'first'"}))
        wait_for(lambda: any(j["state"] == "running" for j in jobs(server)), 30, "the first cell running")
        with RawSession(server) as second:
            welcome = second.hello(session=session_id)
            assert welcome["resumed"] is True and welcome["last_request"] == 1
            code, reason = first.close_reason()
            assert code == wire.CLOSE_TAKEN_OVER and reason == wire.TAKEN_OVER_REASON
            # Reusing the first client's id is an error that names it, and the cell does not run.
            second.send(wire.Frame("cell", 1, {"source": "'second, reused id'"}))
            reused = second.answer(1)
            assert reused.type == "error" and reused["code"] == "bad_request"
            assert "request id 1 " in reused["evalue"]
            release.touch()
            # The first cell's answer comes to the socket that holds the session now.
            first_answer = second.answer(1)
            assert first_answer.type == "result" and wire.loads(first_answer.buffers) == "first"
            assert second.value("cell", {"source": "'second'"}) == "second"
    with RawSession(server) as third:
        third.hello(session=session_id)
        assert third.value("cell", {"source": "_"}) == "second"  # the session went on


class SocketSession:
    """A ``/ws/session`` client on a plain socket (websockets' sans-I/O protocol), which reads
    from the socket only when told: while it does not, the server's sends back up for real."""

    def __init__(self, server: ServerProcess) -> None:
        self.sock = socket.create_connection((server.host, server.port), timeout=30)
        self.protocol = ClientProtocol(parse_uri(server.ws_url("/ws/session")), max_size=None)
        request = self.protocol.connect()
        request.headers.update(auth(server.token))
        self.protocol.send_request(request)
        self._flush()
        self.decoder = wire.FrameDecoder()
        self.frames: list[wire.Frame] = []
        while self.protocol.handshake_exc is None and self.protocol.state is not State.OPEN:
            self._read()
        assert self.protocol.handshake_exc is None, self.protocol.handshake_exc

    def _flush(self) -> None:
        self.sock.sendall(b"".join(self.protocol.data_to_send()))

    def _read(self) -> None:
        data = self.sock.recv(1 << 20)
        self.protocol.receive_data(data) if data else self.protocol.receive_eof()
        for event in self.protocol.events_received():
            if isinstance(event, WsFrame) and event.opcode in (Opcode.BINARY, Opcode.CONT):
                frame = self.decoder.feed(bytes(event.data))
                if frame is not None:
                    self.frames.append(frame)
        self._flush()  # the protocol's answers (pong, the close reply)
        if not data:
            raise EOFError("the server dropped the socket without a close frame")

    def send(self, frame: wire.Frame) -> None:
        for message in wire.encode_frame(frame):
            self.protocol.send_binary(bytes(message))
        self._flush()

    def read_until_closed(self) -> tuple[int, str, int]:
        """Read everything until the server's close frame: its code and reason, and the bytes
        of stream text received on the way."""
        while self.protocol.close_rcvd is None:
            self._read()
        text = sum(len(frame.get("text") or "") for frame in self.frames)
        return self.protocol.close_rcvd.code, self.protocol.close_rcvd.reason, text


@pytest.mark.slow
def test_a_connection_taken_over_while_it_reads_slowly_is_closed_with_4001(make_server: MakeServer) -> None:
    """The old connection has not read 100 MB of output (the server's sender waits for room in
    its socket) when a second attach takes the session over and the old client sends an ack:
    the old connection must still get close code 4001 and the reason (a bare drop reads as a
    lost link, and its client would reconnect and take the session back)."""
    server = make_server(session_buffer="1GiB")
    lines = 100_000
    first = SocketSession(server)
    try:
        first.send(wire.Frame("hello", 0, {"session": None, "last_seq": 0, "python": wire.PYTHON_VERSION,
                                           "cloudpickle": wire.cloudpickle_version(), "protocol": wire.PROTOCOL_VERSION}))
        while not first.frames:
            first._read()
        session_id = first.frames[0]["session"]
        first.send(wire.Frame("cell", 1, {"source": f"for i in range({lines}):\n    print('z' * 999)"}))
        wait_for(lambda: jobs(server), 30, "the cell started")
        wait_for(lambda: not jobs(server), 300, "the cell ended")  # far more than a socket holds is unread
        with RawSession(server) as second:
            second.hello(session=session_id)
            first.send(wire.Frame("ack", 0, {"seq": 1}))  # the old client still talks as it reads
            # Only once the server is surely past that ack (a round trip on the new socket later)
            # does the old client read again.
            assert second.value("cell", {"source": "'second'"}) == "second"
            code, reason, received = first.read_until_closed()
        assert (code, reason) == (wire.CLOSE_TAKEN_OVER, wire.TAKEN_OVER_REASON)
        assert received < lines * 1000  # told at once, not after the whole backlog
    finally:
        first.sock.close()


@pytest.mark.slow
def test_a_reset_frees_the_old_namespace(make_server: MakeServer) -> None:
    """A function defined in a namespace refers to it (a cycle): reset must still free it now."""
    server = make_server()
    baseline = rss(server)
    with RawSession(server) as raw:
        raw.hello()
        source = "big = np.ones(50 * 2**20)\ndef size():\n    return big.nbytes\nsize()"
        assert raw.value("cell", {"source": source}) == 400 * MiB
        assert rss(server) - baseline > 300 * MiB
        assert raw.call("reset").type == "result"
        wait_for(lambda: rss(server) - baseline < 100 * MiB, 30, "the old namespace's 400 MiB freed by the reset")
        assert raw.call("cell", {"source": "big"})["ename"] == "NameError"


@pytest.mark.slow
def test_a_large_result_is_freed_once_the_client_has_it(make_server: MakeServer) -> None:
    """The device worker keeps nothing of a finished job: a 400 MiB result is freed once the
    client has acknowledged it, not when the next job comes."""
    server = make_server()
    baseline = rss(server)
    with RawSession(server) as raw:
        raw.hello()
        raw.send(wire.Frame("run", 1, {}, wire.dumps((np.ones, (50 * 2**20,), {}))))
        answer = raw.answer(1)
        assert answer.type == "result" and wire.loads(answer.buffers).nbytes == 400 * MiB
        del answer
        raw.send(wire.Frame("ack", 0, {"seq": 10**6}))
        wait_for(lambda: rss(server) - baseline < 100 * MiB, 30, "the result's 400 MiB freed")


@pytest.mark.slow
def test_a_client_that_reads_and_acknowledges_gets_all_output_past_the_session_buffer(
        make_server: MakeServer) -> None:
    """A cell printing 40 times the session buffer to a client that reads and acknowledges as
    it goes: the printing waits for the client, nothing is dropped, every line arrives in order."""
    server = make_server(session_buffer="1MiB")
    lines = 40_000
    with RawSession(server) as raw:
        raw.hello()
        raw.send(wire.Frame("cell", 1, {"source": f"for i in range({lines}):\n    print(str(i).rjust(999, 'y'))\n'done'"}))
        text: list[str] = []
        while True:
            frame = raw.receive()
            raw.send(wire.Frame("ack", 0, {"seq": frame["seq"]}))
            if frame.type == "stream":
                text.append(frame["text"])
            elif frame.type in ("result", "error"):
                break
    assert frame.type == "result" and wire.loads(frame.buffers) == "done"
    printed = "".join(text)
    assert "of output dropped" not in printed
    assert printed.splitlines() == [str(i).rjust(999, "y") for i in range(lines)]


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
    assert received is not None and received.code == wire.CLOSE_PROTOCOL_MISUSE and "hello" in received.reason
    assert_healthy(server)
