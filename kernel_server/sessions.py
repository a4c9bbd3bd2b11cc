"""Notebook sessions: a namespace each, requests in order, output kept until the client has it.

A session outlives its WebSocket. Every frame it sends gets a sequence number and stays in the
outbox until the client acknowledges it, so a client that reconnects after a dropped tunnel is
sent exactly what it missed, and the results of work that ran meanwhile. A disconnected session
is kept for ``--session-idle`` seconds.

Ordering: a session's requests are handled one after another by its own lane. ``run`` and
``cell`` are queued as device jobs (the lane does not wait for them, so they queue back to
back); ``push``, ``pull`` and ``reset`` wait for this session's earlier jobs only, never for
another session's.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import platform
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from mymps_magic import wire

from .capture import Execution, Outlet
from .execution import error_frame, new_namespace, run_request, unpickle_error, value_frame, versions_mismatch
from .jobs import Job, JobQueue
from .lifecycle import describe_job
from .loopqueue import LoopQueue
from .outbox import Mailbox, Outbox, Room
from .serverstate import server_version
from .tokenizers import TokenizersView

if TYPE_CHECKING:
    from .device import Device
    from .registry import Registry

log = logging.getLogger("kernel_server.sessions")


class Session:
    """One client's namespace, outbox and lane of requests."""

    def __init__(self, manager: SessionManager) -> None:
        self.id = uuid.uuid4().hex
        self.manager = manager
        self.namespace = manager.new_namespace()
        self.outbox = Outbox(manager.buffer_bytes)
        self.last_request = 0
        self.mismatch: str | None = None
        self.client_torch = False  # the client has torch (its hello says): a cell's tensor comes back
        self.jobs: dict[int, Job] = {}
        self.disconnected_at: float | None = time.time()
        self._live: Mailbox | None = None
        self._lane: asyncio.Queue[wire.Frame] = asyncio.Queue()
        self._in_lane: set[int] = set()  # request ids the lane has not handled yet
        self._dropped: set[int] = set()  # of those, the ones cancelled meanwhile
        self._lane_task: asyncio.Task[None] | None = asyncio.ensure_future(self._run_lane())
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._posted = LoopQueue(self._loop)  # every frame from another thread, in order
        self._room = Room(self.outbox.limit)
        # Buffers of large requests, sent as HTTP bodies (`PUT /session/{id}/upload`), until
        # the request that names them arrives.
        self.uploads: dict[str, list[Any]] = {}
        self._upload_ids = itertools.count(1)

    # -- sending ---------------------------------------------------------------------------------

    def emit(self, frame: wire.Frame) -> None:
        """Number, keep and (if connected) send a frame; output past ``--session-buffer`` is
        dropped (see :mod:`.outbox`). Event loop thread only."""
        kept = self.outbox.add(frame)
        self._room.held = self.outbox.nbytes
        if kept and self._live is not None:
            self._live.wake()

    def emit_threadsafe(self, frame: wire.Frame) -> None:
        self._posted.post(functools.partial(self.emit, frame))

    def emit_output(self, job: Job, frame: wire.Frame) -> None:
        """Send one output frame of a running request, from the thread that wrote it: first,
        while a connected client acknowledges what it reads, wait for room (see :class:`.Room`).
        Not on the event loop's thread (a library printing there while a cell's output is
        captured): the acks that make room arrive on it, so its text goes on at once.

        Raises:
            Cancelled: the job was cancelled while its output waited.
        """
        may_wait = self._off_loop()
        size = self._room.wait(frame, lambda: may_wait and self._live is not None, job.check_cancelled, self.id)
        self._posted.post(functools.partial(self._emit_posted, frame, size))

    def _off_loop(self) -> bool:
        """Whether the calling thread may wait for room: any but the event loop's."""
        return threading.get_ident() != self._loop_thread

    def _emit_posted(self, frame: wire.Frame, size: int) -> None:
        # In the outbox (and `held`) before it leaves `posted`: counted twice for a moment, never
        # not at all, or a writer could post into room that is not there and see it dropped.
        self.emit(frame)
        self._room.arrived(size)

    def attach(self, last_seq: int) -> Mailbox:
        """Connect a new socket: returns its place in the outbox, just past what the client has.

        A socket still attached is taken over: its sender stops and closes it with
        ``wire.CLOSE_TAKEN_OVER``, and what it receives from then on is ignored. The newer
        connection wins because a reconnect through a dropped tunnel usually arrives while the
        server still thinks the old socket is up; refusing it would stall the user for as long
        as the old socket takes to time out.
        """
        self.ack(last_seq)
        if self._live is not None:
            self._live.take_over()
            log.info("session %s taken over by a new connection", self.id[:8])
        self._live = Mailbox(self.outbox, last_seq)
        self.disconnected_at = None
        self._room.client_reads()
        return self._live

    def detach(self, live: Mailbox) -> None:
        if self._live is live:  # a newer socket may have taken over already
            self._live = None
            self.disconnected_at = time.time()
            self._room.wake()  # output waiting for this client's acks is dropped from now on
            log.info("session %s disconnected; kept %g s for a reconnect", self.id[:8], self.manager.idle_s)

    def ack(self, seq: int) -> None:
        if self.outbox.ack(seq):
            self._room.held = self.outbox.nbytes
            self._room.client_reads()

    def add_upload(self, buffers: list[Any]) -> str:
        upload_id = str(next(self._upload_ids))
        self.uploads[upload_id] = buffers
        return upload_id

    # -- requests --------------------------------------------------------------------------------

    def receive(self, frame: wire.Frame) -> None:
        """Take one request frame from the socket; a malformed one is a ``bad_request`` error."""
        try:
            self._receive(frame)
        except (TypeError, ValueError) as exc:
            malformed = ValueError(f"malformed {frame.type!r} request: {exc}")
            self.emit(error_frame(frame.id, malformed, wire.ERROR_BAD_REQUEST))

    def _receive(self, frame: wire.Frame) -> None:
        seq = wire.read_ack(frame)  # requests carry the client's ack too
        if seq is not None:
            self.ack(seq)
        if frame.type == "ack":
            return
        bad_id = _bad_request_id(frame.id, self.last_request)
        if bad_id:
            self.emit(error_frame(frame.id, ValueError(bad_id), wire.ERROR_BAD_REQUEST))
            return
        self.last_request = frame.id
        if "upload" in frame.fields:  # its buffers came as an HTTP body
            buffers = self.uploads.pop(str(frame.fields["upload"]), None)
            if buffers is None:
                self.emit(error_frame(frame.id, ValueError(
                    f"upload {frame.fields['upload']!r} is not on the server (used already, or sent to another "
                    "session); send the request again"), wire.ERROR_BAD_REQUEST))
                return
            frame.buffers = buffers
        if frame.type == "interrupt":
            self._interrupt(wire.read_target(frame))
            self.emit(wire.answer(frame.id))
        elif frame.type == "cancel":
            self._cancel(frame.id, wire.read_target(frame))
        elif frame.type in ("run", "cell") and not self._in_lane:
            self._submit(frame)  # nothing of this session waits in its lane: queue the job now
        elif frame.type in ("run", "cell", "push", "pull", "reset"):
            self._in_lane.add(frame.id)
            self._lane.put_nowait(frame)
        else:
            self.emit(error_frame(frame.id, ValueError(f"unknown request type {frame.type!r}"), wire.ERROR_BAD_REQUEST))

    async def _run_lane(self) -> None:
        while True:
            frame = await self._lane.get()
            if frame.id in self._dropped:  # cancelled while it waited in the lane
                self._dropped.discard(frame.id)
                self._in_lane.discard(frame.id)
                continue
            try:
                if frame.type in ("run", "cell"):
                    self._submit(frame)
                else:
                    await self._after_my_jobs()
                    await getattr(self, f"_{frame.type}")(frame)
            except Exception as exc:  # one bad request must not stop the lane
                log.exception("session %s: request %s failed", self.id[:8], frame.id)
                self.emit(error_frame(frame.id, exc, wire.ERROR_BAD_REQUEST))
            finally:
                self._in_lane.discard(frame.id)

    async def _after_my_jobs(self) -> None:
        pending = [asyncio.wrap_future(job) for job in self.jobs.values()]
        if pending:
            await asyncio.wait(pending)

    def _submit(self, frame: wire.Frame) -> None:
        if frame.type == "run" and self.mismatch:
            self.emit(error_frame(frame.id, RuntimeError(self.mismatch), wire.ERROR_VERSION))
            return
        if frame.type == "cell":
            try:
                wire.read_source(frame)
            except ValueError as exc:
                self.emit(error_frame(frame.id, exc, wire.ERROR_BAD_REQUEST))
                return
        rid, manager = frame.id, self.manager

        def work(job: Job) -> wire.Frame:
            if frame.get("notify_start"):  # only futures need it: a blocking caller just waits
                self.emit_threadsafe(wire.started(rid, job.id))
            outlet = Outlet(functools.partial(self.emit_output, job), rid, self._off_loop)
            return run_request(job, frame, self.namespace, manager.execution, outlet, manager.device,
                               self.client_torch)

        job = self.manager.jobs.submit(work, frame.type, session=self.id)
        self.jobs[rid] = job
        ahead = self.manager.jobs.waits_for(job)
        if ahead is not None:  # the caller would otherwise see nothing happen, and not know why
            this = "cell" if frame.type == "cell" else "call"
            self.emit(wire.stream(rid, "stderr", f"mymps: waiting for {describe_job(ahead)} to finish; "
                                  f"this {this} runs after it\n"))
        # The answer goes out from the done callback: the worker's last step before it waits
        # again, so the event loop it wakes does not then wait for the GIL.
        job.add_done_callback(functools.partial(self._job_done, rid))

    def _job_done(self, rid: int, job: Job) -> None:
        if job.cancelled():
            self._posted.post(functools.partial(self._cancelled, rid, job))
            return
        exc = job.exception()
        frame = job.result() if exc is None else error_frame(rid, exc)
        self._posted.post(functools.partial(self._finish, rid, frame))

    def _finish(self, rid: int, frame: wire.Frame) -> None:
        """The request's last frame; its job leaves the session's list in the same loop turn."""
        self.jobs.pop(rid, None)
        self.emit(frame)

    def _interrupt(self, target: int) -> None:
        for rid, job in list(self.jobs.items()):
            if target in (0, rid):
                self.manager.jobs.interrupt(job)

    def _cancelled(self, rid: int, job: Job) -> None:
        """A queued job was dropped. A cancel of this session's own answered already and took
        it off ``jobs``; one from outside (DELETE /jobs: `mymps cancel`, the panel, the
        dashboard) did not, and the caller, still waiting, is told here."""
        if self.jobs.pop(rid, None) is not None:
            self.emit(error_frame(rid, RuntimeError(f"job {job.id} was {job.cancel_reason} before it ran"),
                                  wire.ERROR_CANCELLED))

    def _cancel(self, rid: int, target: int) -> None:
        job = self.jobs.get(target)
        if job is not None:
            cancelled = self.manager.jobs.drop(job)
            if cancelled:
                self.jobs.pop(target, None)
        else:  # still in this session's lane, behind a push or pull: it will be skipped
            cancelled = target in self._in_lane and target not in self._dropped
            if cancelled:
                self._dropped.add(target)
        self.emit(wire.answer(rid, cancelled=bool(cancelled)))

    async def _push(self, frame: wire.Frame) -> None:
        try:
            values = await asyncio.to_thread(wire.loads, frame.buffers)
        except Exception as exc:
            self.emit(error_frame(frame.id, unpickle_error(exc), wire.ERROR_PICKLE))
            return
        self.namespace.update(values)
        self.emit(wire.answer(frame.id, names=sorted(values)))

    async def _pull(self, frame: wire.Frame) -> None:
        names = wire.read_names(frame)
        missing = [n for n in names if n not in self.namespace]
        if missing:
            self.emit(error_frame(frame.id, NameError(
                f"{', '.join(map(repr, missing))} {'is' if len(missing) == 1 else 'are'} not defined in the remote "
                "session; define it there first (a %%mymps cell or run) or push it"), wire.ERROR_NAME))
            return
        values = tuple(self.namespace[n] for n in names)
        self.emit(await asyncio.to_thread(value_frame, frame.id, values, names))

    async def _reset(self, frame: wire.Frame) -> None:
        # Emptied, not just replaced: functions defined in it refer to it as their globals, a
        # cycle that would keep all of its values (gigabytes, maybe) until the cyclic collector
        # runs. Safe: the lane waited for this session's jobs, so no code of it is running.
        old, self.namespace = self.namespace, self.manager.new_namespace()
        old.clear()
        self.emit(wire.answer(frame.id))

    def close(self) -> None:
        """End the session and free what it holds now, not at the next garbage collection.

        Reference cycles would otherwise keep a reaped session (and a namespace of gigabytes)
        alive until the cyclic collector happens to run: the cancelled lane task's traceback
        refers to this session, and the functions defined in a namespace refer to it as their
        globals. So the task is let go of and the namespace emptied (unless a job still uses it).
        """
        if self._lane_task is None:  # closed already
            return
        self._lane_task.cancel()
        self._lane_task = None
        self.uploads.clear()
        for job in self.jobs.values():
            self.manager.jobs.abandon(job, "cancelled: its session ended")
        if not self.jobs:
            self.namespace.clear()


MAX_REQUEST_ID = 2**63 - 1


def _bad_request_id(rid: int, last: int) -> str | None:
    """Why ``rid`` cannot be the next request of a session whose last one was ``last``, or None.

    Ids must increase within a session, and fit an int64 (a client in another language must be
    able to hold them). A bad id is answered with an error frame that names it, and the session
    goes on: the id is not counted, so one huge id cannot make every later request look old.

    Why no id at or below ``last`` is ever taken as a harmless resend: the welcome tells a
    reconnecting client ``last_request``, computed after its new socket took the session over
    (so the old socket can add nothing later), and the client resends only what lies above it.
    An id at or below it therefore never comes from a client that follows the protocol; it
    comes from a second program using the same session id, and is refused, not run. That
    program is still sent the first one's frames (a session's frames go to whichever socket
    holds it, replayed from the hello's ``last_seq``), its answer for the same id included:
    this error is how it learns that the id was not its own.
    """
    if not 0 < rid <= MAX_REQUEST_ID:
        return f"request id {rid} is out of range: ids run from 1 to 2**63-1 and increase; the request was not run"
    if rid <= last:
        return (f"request id {rid} is not above {last}, the last id this session received: ids must increase "
                "(after a hello, start above the welcome's last_request); the request was not run")
    return None


class SessionManager:
    """All sessions of the server, and the idle reaper for disconnected ones."""

    def __init__(self, device: Device, registry: Registry, jobs: JobQueue, idle_s: float, buffer_bytes: int) -> None:
        """``buffer_bytes`` bounds what each session keeps for its client (``--session-buffer``)."""
        self.device = device
        self.registry = registry
        self.jobs = jobs
        self.idle_s = idle_s
        self.buffer_bytes = buffer_bytes
        self.execution = Execution()
        self.sessions: dict[str, Session] = {}
        self._reaper = asyncio.ensure_future(self._reap())

    def new_namespace(self) -> dict[str, Any]:
        namespace = new_namespace(self.device, self.registry, self.execution)
        namespace["tokenizers"] = TokenizersView(self.registry)
        return namespace

    def open(self, session_id: str | None) -> tuple[Session, bool]:
        """The session to resume, or a new one; the bool says whether it was resumed."""
        if session_id and session_id in self.sessions:
            log.info("session %s resumed", session_id[:8])
            return self.sessions[session_id], True
        session = Session(self)
        self.sessions[session.id] = session
        log.info("session %s opened", session.id[:8])
        return session, False

    def welcome(self, session: Session, resumed: bool, hello: wire.Hello) -> wire.Frame:
        session.mismatch = versions_mismatch(hello.python, hello.cloudpickle)
        session.client_torch = hello.torch
        return wire.welcome(session.id, resumed, platform.python_version(), server_version(), session.last_request,
                            session.mismatch, self.buffer_bytes)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, max(0.5, self.idle_s / 4)))
            self._reap_idle(time.time())

    def _reap_idle(self, now: float) -> None:
        """Close the sessions disconnected for longer than ``--session-idle``. A function of
        its own, not part of ``_reap``'s loop: a coroutine's local variables live as long as it
        waits, and would keep the last reaped session (its namespace, its outbox) alive."""
        for sid, session in list(self.sessions.items()):
            idle_since = session.disconnected_at
            if idle_since is not None and now - idle_since > self.idle_s and not session.jobs:
                session.close()
                del self.sessions[sid]
                log.info("session %s reaped after %.0f s disconnected; its namespace is freed", sid[:8],
                         now - idle_since)

    def close(self) -> None:
        self._reaper.cancel()
        for session in self.sessions.values():
            session.close()
        self.execution.close()
