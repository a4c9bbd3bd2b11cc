"""A frame fuzzer for ``/ws/session`` and the streaming WebSockets (issue 16, item 2).

Each case sends one kind of bad input on a connection of its own: truncated msgpack, wrong types,
huge declared lengths, unknown types, text where binary is expected, reused and decreasing ids,
pickles that raise in ``__setstate__`` or ``__reduce__``; and to ``/ws/generate`` and the app's
other streaming WebSockets (read from its router: ``/ws/chat``), JSON of every wrong shape. Each
must get an error frame or a close with a code and a reason, within a bound that tells "hung"
from "slow"; afterwards another session still runs code and a generation still streams. The cases are built from the wire's own frames, cut and bent, so a change to the wire
carries over.
"""

from __future__ import annotations

import json
import pickle
import random
import struct
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from kit import ServerProcess, TinyModels, auth, never_ending_copy
from mymps_magic import Client, wire
from test_session_bad_input import RawSession, assert_session_works, raw_header

TEXT = "fuzz-frames-llama"
ANSWER_TIMEOUT_S = 30.0  # per answer: far past any real one, so only a hang reaches it
SENTINEL = 10_000  # the id of the request that proves a session still answers
CLEAR_CLOSES = (1003, 1007, 1008, 1009, 1011, wire.CLOSE_PROTOCOL_MISUSE)


def encoded(frame: wire.Frame) -> bytes:
    return b"".join(bytes(message) for message in wire.encode_frame(frame))


def header(**fields: Any) -> bytes:
    """A frame's header with exactly these fields (no buffers follow)."""
    return raw_header({"v": wire.PROTOCOL_VERSION, "id": 1, "bufs": [], **fields})


class RaisesInReduce:
    def __reduce__(self) -> tuple[Any, ...]:
        return int, ("not a number",)  # int("not a number") raises while unpickling


class RaisesInSetstate:
    def __reduce__(self) -> tuple[Any, ...]:
        return random.Random, (), ("not a random state",)  # Random.__setstate__ raises


class MissingModule:
    def __reduce__(self) -> tuple[Any, ...]:
        return pickle.loads, (b"\x80\x05\x95\x0f\x00\x00\x00\x00\x00\x00\x00\x8c\x0bno_such_mod\x94\x8c\x01x\x94\x93\x94.",)


def call_pickle(fn: Any) -> list[bytes]:
    return [pickle.dumps((fn, (), {}), protocol=5)]


RUN = encoded(wire.Frame("run", 1, {}, call_pickle(abs)))

# name -> the messages sent after a hello (bytes: binary, str: text)
SESSION_CASES: dict[str, list[bytes | str]] = {
    "truncated-length": [RUN[:3]],
    "truncated-header": [RUN[:4 + 5]],
    "truncated-buffer": [RUN[:-3]],
    "trailing-bytes": [RUN + b"\x00\x01"],
    "header-length-huge": [struct.pack(">I", 0xFFFFFFFF) + RUN[4:]],
    "header-length-zero": [struct.pack(">I", 0) + RUN[4:]],
    "msgpack-truncated-map": [struct.pack(">I", 3) + b"\x85\xa1t"],
    "msgpack-ext-type": [struct.pack(">I", 3) + b"\xd4\x05\x00"],
    "type-not-a-string": [header(t=123)],
    "type-empty": [header(t="")],
    "type-unknown": [header(t="frobnicate")],
    "type-of-the-server": [header(t="welcome")],
    "type-result": [header(t="result")],
    "id-a-string": [header(t="cell", id="seven", source="1")],
    "id-negative": [header(t="cell", id=-5, source="1")],
    "id-huge": [header(t="cell", id=2**63, source="1")],
    "id-float": [header(t="cell", id=1.5, source="1")],
    "bufs-a-string": [header(t="run", bufs="abc")],
    "bufs-negative": [header(t="run", bufs=[-1])],
    "bufs-float": [header(t="run", bufs=[1.5])],
    "bufs-huge": [header(t="push", bufs=[2**62])],
    "bufs-over-max-body-chunked": [header(t="push", bufs=[2**40], chunked=True)],
    "bufs-too-many": [header(t="push", bufs=[0] * (wire.MAX_BUFFERS + 1))],
    "version-a-string": [raw_header({"v": "1", "t": "cell", "id": 1, "bufs": [], "source": "1"})],
    "source-not-a-string": [header(t="cell", source=12)],
    "source-a-map": [header(t="cell", source={"a": 1})],
    "names-not-a-list": [header(t="pull", names=5)],
    "names-of-numbers": [header(t="pull", names=[1, 2])],
    "target-not-a-number": [header(t="interrupt", target=[1])],
    "ack-not-a-number": [header(t="ack", id=0, seq={"x": 1})],
    "upload-unknown": [header(t="run", upload="no-such-upload")],
    "text-not-binary": ["hello"],
    "text-json": ['{"t": "cell", "id": 1, "source": "1"}'],
    "empty-binary": [b""],
    "second-hello": [encoded(wire.hello(None, 0))],
    "pickle-raises-in-reduce": [encoded(wire.Frame("run", 1, {}, call_pickle(RaisesInReduce())))],
    "pickle-raises-in-setstate": [encoded(wire.Frame("run", 1, {}, call_pickle(RaisesInSetstate())))],
    "pickle-of-a-missing-module": [encoded(wire.Frame("run", 1, {}, call_pickle(MissingModule())))],
    "pickle-truncated": [encoded(wire.Frame("run", 1, {}, [call_pickle(abs)[0][:-4]]))],
    "push-raises-in-setstate": [encoded(wire.Frame("push", 1, {}, [pickle.dumps({"x": RaisesInSetstate()})]))],
    "reused-id": [encoded(wire.Frame("cell", 1, {"source": "1"})), encoded(wire.Frame("cell", 1, {"source": "2"}))],
    "decreasing-id": [encoded(wire.Frame("cell", 5, {"source": "1"})), encoded(wire.Frame("cell", 3, {"source": "2"}))],
}


def answer_or_close(raw: RawSession) -> tuple[list[wire.Frame], tuple[int | None, str] | None]:
    """Everything the server sends after the case: frames up to the sentinel's answer, or the
    close (code, reason) if it closes. A ``TimeoutError`` means it hung."""
    frames: list[wire.Frame] = []
    try:
        raw.send(wire.Frame("cell", SENTINEL, {"source": "'still here'"}))
        while True:
            frame = raw.receive(timeout=ANSWER_TIMEOUT_S)
            frames.append(frame)
            if frame.id == SENTINEL and frame.type in ("result", "error"):
                return frames, None
    except ConnectionClosed as closed:
        received = closed.rcvd
        return frames, (received.code, received.reason) if received is not None else (None, "")


@pytest.mark.slow
@pytest.mark.parametrize("before_hello", [False, True], ids=["after-hello", "as-first-message"])
def test_every_bad_session_frame_gets_an_error_frame_or_a_clear_close(
    server: ServerProcess, before_hello: bool
) -> None:
    unclear: list[str] = []
    for name, messages in SESSION_CASES.items():
        if before_hello and name == "second-hello":
            continue  # as a first message it is the hello itself
        with RawSession(server) as raw:
            if not before_hello:
                raw.hello()
            for message in messages:
                raw.ws.send(message)
            frames, closed = answer_or_close(raw)
        answered = [frame for frame in frames if frame.type in ("error", "result") and frame.id != SENTINEL]
        errors = [frame for frame in answered if frame.type == "error"]
        if closed is not None:
            code, reason = closed
            if code not in CLEAR_CLOSES or not reason:
                unclear.append(f"{name}: closed with {code} {reason!r}")
        elif before_hello:
            unclear.append(f"{name}: taken as a first frame without a close")
        elif not errors and name not in TOLERATED:
            unclear.append(f"{name}: neither an error frame nor a close; got {[f.type for f in frames]}")
        for frame in errors:
            if not frame.get("evalue") or "\n" in str(frame.get("evalue")):
                unclear.append(f"{name}: an error frame without a one-line message: {frame.fields}")
    assert not unclear, "\n".join(unclear)
    assert_session_works(server)


TOLERATED = {
    # Valid requests, answered as such; the cases are about what follows them.
    "reused-id": "the second is refused (an error frame) or ignored as already seen",
    "ack-not-a-number": "an ack is never answered; what matters is that the session goes on",
}


def test_reused_and_decreasing_ids_are_answered_once_and_never_run_twice(server: ServerProcess) -> None:
    with RawSession(server) as raw:
        raw.hello()
        assert raw.value("cell", {"source": "counter = 1"}) is None
        raw.next_id = 20
        assert raw.value("cell", {"source": "counter += 1; counter"}) == 2
        for again in (20, 7):
            raw.send(wire.Frame("cell", again, {"source": "counter += 1; counter"}))
            frames, closed = answer_or_close(raw)
            assert closed is None, closed
            errors = [f for f in frames if f.id == again and f.type == "error"]
            assert len(errors) == 1 and "id" in errors[0]["evalue"], [f.fields for f in frames]
        raw.next_id = SENTINEL + 1
        assert raw.value("pull", {"names": ["counter"]}) == (2,)


# --- /ws/generate --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_model(server: ServerProcess, tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    llama = never_ending_copy(tiny_models.text_llama, tmp_path_factory.mktemp("frames") / "llama")
    with Client(port=server.port, token=server.token) as client:
        client.load_model(TEXT, kind="text", path=str(llama), progress=False)
        yield TEXT
        client.unload_model(TEXT)


def good(**fields: Any) -> str:
    return json.dumps({"model": TEXT, "prompt": "hi", "max_new_tokens": 2, **fields})


GENERATE_CASES: dict[str, Callable[[], list[bytes | str]]] = {
    "not-json": lambda: ["{not json"],
    "binary": lambda: [b"\x81\xa5model\xa1x"],
    "binary-json": lambda: [good().encode()],
    "empty": lambda: [""],
    "array": lambda: ["[1, 2]"],
    "number": lambda: ["5"],
    "null": lambda: ["null"],
    "deeply-nested": lambda: ["[" * 100_000 + "]" * 100_000],
    "deeply-nested-field": lambda: [good(stop=None)[:-1] + ', "x": ' + "[" * 50_000 + "]" * 50_000 + "}"],
    "model-a-number": lambda: [good(model=5)],
    "prompt-a-list": lambda: [good(prompt=["a"])],
    "prompt-empty": lambda: [good(prompt="")],
    "tokens-a-string": lambda: [good(max_new_tokens="ten")],
    "tokens-huge": lambda: [good(max_new_tokens=10**30)],
    "tokens-negative": lambda: [good(max_new_tokens=-1)],
    "temperature-nan": lambda: [good()[:-1] + ', "temperature": NaN}'],
    "temperature-infinite": lambda: [good()[:-1] + ', "temperature": Infinity}'],
    "top-p-zero": lambda: [good(top_p=0)],
    "seed-huge": lambda: [good(seed=2**70)],
    "stop-a-number": lambda: [good(stop=5)],
    "stop-too-many": lambda: [good(stop=["x"] * 1000)],
    "unknown-model": lambda: [good(model="no-such-model")],
    "unicode-surrogate": lambda: ['{"model": "' + TEXT + '", "prompt": "\\ud800"}'],
    "second-request": lambda: [good(max_new_tokens=64), good()],
    "cancel-first": lambda: [json.dumps({"type": "cancel"})],
}


def generate_answers(server: ServerProcess, messages: list[bytes | str], path: str = "/ws/generate"
                     ) -> tuple[list[dict[str, Any]], Any]:
    """Every message the server sends until it closes, and the close (code, reason)."""
    answers: list[dict[str, Any]] = []
    with connect(server.ws_url(path), additional_headers=auth(server.token), proxy=None,
                 open_timeout=30, max_size=None) as ws:
        for message in messages:
            ws.send(message)
        try:
            while True:
                answers.append(json.loads(ws.recv(timeout=ANSWER_TIMEOUT_S)))
        except ConnectionClosed as closed:
            received = closed.rcvd
            return answers, (received.code, received.reason) if received is not None else (None, "")


def streaming_routes() -> list[str]:
    """The app's WebSockets that take one JSON request and stream an answer: all but the session's."""
    from test_security_boundary import app_routes

    return [path for method, path in app_routes() if method == "WS" and path != "/ws/session"]


@pytest.mark.slow
@pytest.mark.parametrize("path", streaming_routes())
def test_every_bad_generate_message_gets_an_error_or_a_clear_close(
    server: ServerProcess, text_model: str, path: str
) -> None:
    unclear: list[str] = []
    for name, messages in GENERATE_CASES.items():
        try:
            answers, (code, reason) = generate_answers(server, messages(), path)
        except TimeoutError:
            unclear.append(f"{name}: no answer and no close in {ANSWER_TIMEOUT_S:g} s")
            continue
        errors = [a for a in answers if a.get("type") == "error"]
        done = [a for a in answers if a.get("type") == "done"]
        if errors:
            if not all(isinstance(e.get("error"), str) and e["error"] and "\n" not in e["error"] for e in errors):
                unclear.append(f"{name}: an error without a one-line message: {errors}")
        elif code in CLEAR_CLOSES and reason:
            pass
        elif not done:
            unclear.append(f"{name}: neither an error, nor a clear close, nor a generation: {answers[-3:]} {code}")
    assert not unclear, "\n".join(unclear)

    health = httpx.get(f"{server.url}/health", trust_env=False, timeout=30)
    assert health.status_code == 200 and TEXT in health.json()["models"]
    answers, (code, _) = generate_answers(server, [good(max_new_tokens=3, temperature=0)])  # on /ws/generate
    assert [a["type"] for a in answers] == ["token"] * 3 + ["done"] and code == 1000
