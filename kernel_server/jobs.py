"""The one ordered queue for device work.

Device work (loads, generations, forward passes, images) runs one job at a time on a single
worker thread, in the order it was submitted, so requests never race on the device and the event
loop stays free: ``/health``, ``/stats``, ``/models`` and ``/jobs`` answer while a job runs.

Jobs are ``concurrent.futures.Future``s. Cancelling a queued job drops it; cancelling a running
one sets ``job.cancelled_flag``, which long jobs (generation, diffusion steps) check between
steps, and raises ``KeyboardInterrupt`` in running user code.

Why user code runs on the main thread: an exception set on another thread cannot break a
``time.sleep`` or a blocking read, but a signal can. ``python -m kernel_server`` therefore runs
this queue's worker on the main thread (``work()``) and uvicorn on another; an interrupt is a
SIGUSR1 sent to that thread, which the handler (``on_interrupt_signal``) turns into
``KeyboardInterrupt`` only while user code of the job to interrupt is running. (SIGUSR1, not
SIGINT: a Ctrl-C in the server's terminal must always mean "shut down".) An app built without that (tests that
embed it) gets a worker thread, where an interrupt still stops pure-Python loops.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import ctypes
import itertools
import logging
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from .errors import Cancelled, NotFound
from .lifecycle import describe_job

log = logging.getLogger("kernel_server.jobs")

INTERRUPT_SIGNAL = signal.SIGUSR1
SHUTDOWN_REASON = "cancelled: the server is shutting down"


class Job(concurrent.futures.Future):  # type: ignore[type-arg]
    """One unit of device work and its outcome."""

    def __init__(self, job_id: str, fn: Callable[[Job], Any], kind: str, model: str | None,
                 session: str | None) -> None:
        super().__init__()
        self.id = job_id
        self.fn = fn
        self.kind = kind
        self.model = model
        self.session = session
        self.submitted = time.time()
        self.started: float | None = None
        self.progress: float | None = None
        self._cancel_requested = False  # set by another thread, only ever read: no Event needed
        self.cancel_reason = "cancelled"
        self.in_user_code = False
        self.interrupt_pending = False

    @contextlib.contextmanager
    def user_code(self) -> Iterator[None]:
        """Mark the stretch where an interrupt may raise ``KeyboardInterrupt``."""
        self.in_user_code = True
        try:
            yield
        finally:
            self.in_user_code = False
            self.interrupt_pending = False

    @property
    def cancelled_flag(self) -> bool:
        """True once someone asked a running job to stop; long jobs poll it between steps."""
        return self._cancel_requested

    def check_cancelled(self) -> None:
        """Raise :class:`Cancelled` if the job was asked to stop."""
        if self._cancel_requested:
            raise Cancelled(f"job {self.id} was {self.cancel_reason}")

    def request_cancel(self, reason: str = "cancelled") -> bool:
        """Ask the running job to stop (the latest reason is the one its client sees); True the
        first time, so that the log says it once."""
        first = not self._cancel_requested
        self.cancel_reason = reason
        self._cancel_requested = True
        return first

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "session": self.session,
            "model": self.model,
            "state": "running" if self.started is not None else "queued",
            "submitted": self.submitted,
            "started": self.started,
            "progress": self.progress,
        }


class JobQueue:
    """FIFO of :class:`Job` executed by one worker thread."""

    def __init__(
        self,
        on_failure: Callable[[BaseException], None] | None = None,
        *,
        own_thread: bool = True,
        on_running: Callable[[Job | None], None] | None = None,
    ) -> None:
        """``on_failure`` runs on the worker after a job fails, e.g. to give cached device memory
        back; ``on_running`` on the worker as each job starts (with it) and ends (with ``None``).
        With ``own_thread=False`` the caller runs :meth:`work` on the thread of its choice (the
        main thread, for interrupts that break a sleep)."""
        self._queue: collections.deque[Job] = collections.deque()
        self._ids = itertools.count(1)
        self._prefix = uuid.uuid4().hex[:6]  # ids of two server runs never meet
        self._lock = threading.Lock()
        # One token per submit (and one for close): the worker blocks in C on it, so it holds
        # the GIL for as short a time as possible around a job (a Condition's wait is Python).
        self._wakeups: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._running: Job | None = None
        self._closed = False
        self._on_failure = on_failure
        self._on_running = on_running
        self._worker: int | None = None
        self._thread: threading.Thread | None = None
        if own_thread:
            self._thread = threading.Thread(target=self.work, name="mymps-device", daemon=True)
            self._thread.start()

    @property
    def running(self) -> Job | None:
        return self._running

    def submit(
        self, fn: Callable[[Job], Any], kind: str, *, model: str | None = None, session: str | None = None
    ) -> Job:
        job = Job(f"{self._prefix}{next(self._ids):x}", fn, kind, model, session)
        with self._lock:
            if self._closed:
                raise Cancelled("the server is shutting down")
            self._queue.append(job)
        self._wakeups.put(None)
        return job

    async def run(
        self, fn: Callable[[Job], Any], kind: str, *, model: str | None = None, session: str | None = None
    ) -> Any:
        """Submit and await the result; a caller that goes away cancels the job."""
        job = self.submit(fn, kind, model=model, session=session)
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            if job.cancelled():  # dropped from the queue: tell the caller why
                raise Cancelled(f"job {job.id} was {job.cancel_reason}") from None
            self.abandon(job, "cancelled: its client went away")
            raise

    def waits_for(self, job: Job) -> Job | None:
        """The job of another session (or of no session: a load, a generation) that ``job``,
        still queued, waits behind: the running one, else the first such ahead of it; None if
        it runs already or only its own session's jobs come first."""
        with self._lock:
            if job not in self._queue:
                return None
            ahead = ([self._running] if self._running else []) + list(
                itertools.takewhile(lambda other: other is not job, self._queue))
        return next((other for other in ahead if other.session is None or other.session != job.session), None)

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            jobs = ([self._running] if self._running else []) + list(self._queue)
        return [job.describe() for job in jobs]

    def using(self, model: str) -> tuple[Job, ...]:
        """The running and queued jobs of ``model``: while there are any, it is in use
        (``lifetime.py`` neither expires nor evicts it)."""
        with self._lock:
            jobs = ([self._running] if self._running else []) + list(self._queue)
        return tuple(job for job in jobs if job.model == model)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"running": int(self._running is not None), "queued": len(self._queue)}

    def cancel(self, job_id: str, reason: str = "cancelled") -> Job:
        """Drop a queued job or ask a running one to stop.

        Raises:
            NotFound: no running or queued job has this id.
        """
        with self._lock:
            for job in self._queue:
                if job.id == job_id:
                    self._queue.remove(job)
                    job.cancel_reason = reason
                    job.cancel()
                    _log_cancel(job, "while queued", reason)
                    return job
            running = self._running
        if running is not None and running.id == job_id:
            if running.request_cancel(reason):
                _log_cancel(running, "while running", reason)
            self.interrupt(running)
            return running
        raise NotFound(f"no running or queued job {job_id!r}; `GET /jobs` lists them")

    def drop(self, job: Job) -> bool:
        """Remove ``job`` if it is still queued (``Future.cancel`` semantics: never a running one)."""
        with self._lock:
            if job not in self._queue:
                return False
            self._queue.remove(job)
        _log_cancel(job, "while queued", "by its session")
        return bool(job.cancel())

    def abandon(self, job: Job, reason: str) -> None:
        """Stop a job whose caller went away; nothing happens if it already finished."""
        if not job.done():
            with contextlib.suppress(NotFound):
                self.cancel(job.id, reason)

    def close(self, reason: str = SHUTDOWN_REASON) -> None:
        """Cancel everything and stop the worker; waits briefly for the running job to stop."""
        with self._lock:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            running = self._running
        self._wakeups.put(None)
        for job in pending:
            job.cancel_reason = reason
            job.cancel()
            _log_cancel(job, "while queued", reason)
        if running is not None:
            if running.request_cancel(reason):
                _log_cancel(running, "while running", reason)
            self.interrupt(running)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def interrupt(self, job: Job) -> bool:
        """Raise ``KeyboardInterrupt`` in ``job``'s user code if it is running some now."""
        if self._running is not job or not job.in_user_code or self._worker is None:
            return False
        job.interrupt_pending = True
        if self._worker == threading.main_thread().ident:
            signal.pthread_kill(self._worker, INTERRUPT_SIGNAL)
        else:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._worker),
                                                       ctypes.py_object(KeyboardInterrupt))
        return True

    def on_interrupt_signal(self, signum: int, frame: FrameType | None) -> None:
        """The handler of :data:`INTERRUPT_SIGNAL`: raises ``KeyboardInterrupt`` into the job an
        interrupt was meant for, and does nothing if that job left its user code meanwhile."""
        job = self._running
        if job is not None and job.interrupt_pending and job.in_user_code:
            job.interrupt_pending = False
            raise KeyboardInterrupt

    def wait_idle(self, timeout: float) -> None:
        """Wait (up to ``timeout`` s) until no job runs: a graceful shutdown lets the cancelled
        job answer its client before the connections close."""
        deadline = time.monotonic() + timeout
        while self._running is not None and time.monotonic() < deadline:
            time.sleep(0.01)

    def work(self) -> None:
        """Run jobs until :meth:`close`; the device worker's loop."""
        self._worker = threading.get_ident()
        while True:
            self._wakeups.get()
            with self._lock:
                if self._closed and not self._queue:
                    return
                if not self._queue:  # its job was dropped or cancelled meanwhile
                    continue
                job = self._queue.popleft()
                if not job.set_running_or_notify_cancel():
                    continue
                self._running = job
                job.started = time.time()
            if self._on_running is not None:
                self._on_running(job)
            failure: BaseException | None = None
            result: Any = None
            try:
                result = job.fn(job)
            except BaseException as exc:  # a failing job must never stop the worker
                failure = exc
            # Off the list before the answer goes out: a client that got its answer and then
            # asks /jobs must not see the job still running. The answer goes out from the
            # job's done callbacks; ``on_running`` (a file write) comes after, off its way.
            with self._lock:
                self._running = None
            if failure is None:
                job.set_result(result)
            else:
                if not job.cancelled_flag:  # a cancel was logged when it was asked for
                    log.warning("%s failed: %s", describe_job(job), _one_line(failure))
                job.set_exception(failure)
                if self._on_failure is not None:
                    self._on_failure(failure)
            if self._on_running is not None:
                self._on_running(None)
            # Keep nothing of a finished job while waiting for the next: its work may hold a
            # session that is about to be reaped, with all of its namespace, and its result may
            # be a value of gigabytes the client has long received.
            del job, failure, result


def _log_cancel(job: Job, when: str, reason: str) -> None:
    """``job 3a (cell, session 1a2b3c4d) cancelled while running: the server is shutting down``."""
    detail = reason.removeprefix("cancelled").lstrip(": ")
    log.info("%s cancelled %s%s", describe_job(job), when, f": {detail}" if detail else "")


def _one_line(exc: BaseException) -> str:
    """An exception as the log shows it: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
