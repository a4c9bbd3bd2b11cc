"""The session outbox as pure logic, in process: numbering, batches, drops and flow control.

The outbox decides what a client is sent and when; a mistake there (a seq skipped or repeated
after a compaction, a batch over its budget, a dropped-output notice in the wrong place) shows
up only rarely end to end, so random runs of adds, reads and acks check it here exactly.
"""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
from typing import Any

import pytest

from kernel_server import outbox
from kernel_server.outbox import BATCH_BYTES, BATCH_FRAMES, FRAME_OVERHEAD, Outbox, Room, frame_size
from mymps_magic import wire

NOTICE = re.compile(r"\[mymps: ([\d,]+) lines .* of output dropped: the client was not reading\]\n")


def output(rid: int, size: int) -> wire.Frame:
    return wire.Frame("stream", rid, {"name": "stdout", "text": "x" * (size - 1) + "\n"})


def result(rid: int) -> wire.Frame:
    return wire.Frame("result", rid, {"fields": {}})


@pytest.mark.parametrize("seed", range(8))
def test_a_reader_gets_every_kept_frame_once_in_order_within_its_batch_budget(seed: int) -> None:
    """Random adds (output that may be dropped, results that never are), reads and acks, with
    enough acks that the outbox compacts many times: the reader's seqs run 1, 2, 3... with no
    gap and no repeat; every batch keeps to its frame and byte budget; and each request's
    dropped output is announced by one notice, right where the output would have been."""
    rng = random.Random(seed)
    box = Outbox(limit=rng.choice([64 * 1024, 1 << 20, 8 << 20]))
    sent = acked = 0
    received: list[wire.Frame] = []
    dropped_lines: dict[int, int] = {}  # per request, output lines dropped and not yet announced
    rid = 1
    reads = rng.choice([0.25, 0.01])  # a reader that keeps up, or one with a backlog of thousands
    for _ in range(20_000):
        roll = rng.random()
        if roll < 0.65 - reads:
            frame = output(rid, rng.choice([10, 200, 5_000, 100_000]))
            if not box.add(frame):
                dropped_lines[rid] = dropped_lines.get(rid, 0) + 1
        elif roll < 0.7 - reads:
            box.add(result(rid))
            rid += 1
        elif roll < 0.7:
            batch = box.after(sent)
            if batch:
                assert len(batch) <= BATCH_FRAMES
                payload = sum(frame_size(f) - FRAME_OVERHEAD for f in batch)
                assert len(batch) == 1 or payload <= BATCH_BYTES
                sent = batch[-1]["seq"]
                received.extend(batch)
        else:
            acked = rng.randint(acked, sent)
            box.ack(acked)
    while batch := box.after(sent):
        sent = batch[-1]["seq"]
        received.extend(batch)

    assert [f["seq"] for f in received] == list(range(1, box.seq + 1))
    assert box._base > 1, "the run must have compacted the outbox"
    announced: dict[int, int] = {}
    for before, frame in zip(received, received[1:]):
        match = NOTICE.fullmatch(before.get("text") or "")
        if match:  # the notice is followed by the frame of its request that was kept next
            assert frame.id == before.id and frame["seq"] == before["seq"] + 1
            announced[before.id] = announced.get(before.id, 0) + int(match[1].replace(",", ""))
    for r in range(1, rid):  # every finished request: all of its dropped output was announced
        assert announced.get(r, 0) == dropped_lines.get(r, 0), r
    assert announced.get(rid, 0) <= dropped_lines.get(rid, 0)  # the last one may still owe a notice

def test_results_are_kept_past_the_bound_and_the_notice_comes_before_them() -> None:
    box = Outbox(limit=10_000)
    assert box.add(output(1, 5_000))
    assert not box.add(output(1, 9_000))
    assert not box.add(output(1, 9_000))
    assert box.add(result(1))
    frames = box.after(0)
    assert [f.type for f in frames] == ["stream", "stream", "result"]
    assert NOTICE.fullmatch(frames[1]["text"]) and "2 lines" in frames[1]["text"]
    assert frames[1]["name"] == "stderr"


def full_room(limit: int = 100_000) -> tuple[Outbox, Room]:
    """An outbox filled to its bound, and its room told so (as the session's loop does)."""
    box = Outbox(limit)
    while box.add(output(1, 1000)):
        pass
    room = Room(limit)
    room.held = box.nbytes
    return box, room


def writer(room: Room, attached: list[bool], cancelled: threading.Event) -> tuple[threading.Thread, list[Any]]:
    """A thread that tries to post one more output frame; what its wait ended with lands in the list."""
    outcome: list[Any] = []

    def check() -> None:
        if cancelled.is_set():
            raise KeyboardInterrupt

    def run() -> None:
        try:
            outcome.append(room.wait(output(1, 1000), lambda: attached[0], check, "0" * 32))
        except KeyboardInterrupt as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_output_waits_for_a_reading_client_and_goes_on_when_it_acknowledges() -> None:
    box, room = full_room()
    thread, outcome = writer(room, [True], threading.Event())
    thread.join(0.5)
    assert thread.is_alive() and not outcome, "output must wait while the client is reading"
    box.ack(box.seq)
    room.held = box.nbytes
    room.client_reads()
    thread.join(10)
    assert outcome == [frame_size(output(1, 1000))]


def test_output_does_not_wait_for_a_client_that_is_away_or_stopped_acknowledging(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox, "ACK_WAIT_S", 0.3)
    _, room = full_room()
    thread, outcome = writer(room, [False], threading.Event())  # away: no wait at all
    thread.join(10)
    assert outcome and not thread.is_alive()

    started = time.monotonic()
    thread, outcome = writer(room, [True], threading.Event())  # attached, but no ack comes
    thread.join(30)
    assert outcome and time.monotonic() - started >= 0.3
    thread, outcome = writer(room, [True], threading.Event())  # stalled now: no second wait
    thread.join(10)
    assert outcome and not thread.is_alive()
    room.client_reads()  # an ack: the client reads again, and output waits for it again
    thread, outcome = writer(room, [True], threading.Event())
    thread.join(0.2)
    assert thread.is_alive()
    room.client_reads()
    thread.join(30)


def test_a_waiting_writer_is_released_by_a_cancel_or_its_client_leaving() -> None:
    _, room = full_room()
    cancelled = threading.Event()
    thread, outcome = writer(room, [True], cancelled)
    thread.join(0.2)
    assert thread.is_alive()
    cancelled.set()
    thread.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], KeyboardInterrupt)

    attached = [True]
    thread, outcome = writer(room, attached, threading.Event())
    thread.join(0.2)
    assert thread.is_alive()
    attached[0] = False
    room.wake()
    thread.join(10)
    assert outcome and not thread.is_alive()


def test_closing_a_session_twice_is_harmless() -> None:
    from kernel_server.app import make_job_queue
    from kernel_server.device import select_device
    from kernel_server.registry import Registry
    from kernel_server.sessions import SessionManager

    async def scenario() -> None:
        device = select_device("cpu")
        jobs = make_job_queue(device, own_thread=True)
        manager = SessionManager(device, Registry(device), jobs, idle_s=60, buffer_bytes=1 << 20)
        session, _ = manager.open(None)
        session.close()
        session.close()
        manager.close()  # closes it a third time
        jobs.close()

    asyncio.run(scenario())
