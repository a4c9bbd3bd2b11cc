"""Model lifetime, as Ollama users expect it: models unloaded once idle past their
``keep_alive``, and idle models unloaded to make room for a load that does not fit.

A model is in use while a running or queued job names it (``JobQueue.using``); only an idle model
expires or is evicted. Its timer starts when the last job using it ends: a model with
``keep_alive`` 300 that generates for ten minutes stays loaded until five minutes after that.
An expired model is unloaded by an ``unload`` job on the one device queue, like any unload, and
that job checks again when it runs: a request queued meanwhile keeps the model.

Endpoints call :meth:`Lifetime.touch` once a request's job is submitted, with the request's
``keep_alive`` if it gave one: that restarts the model's timer and, given a value, changes it.

Memory: a load's size is estimated from its files (``footprint.py``) before anything is read;
when it exceeds what is free (the device's free memory, and what ``--memory-limit`` leaves beside
the loaded models), the least recently used idle models are unloaded first, unless
``--no-evict``; when even that cannot make room, the load is a 507 that says how much it needs
and how much is free, and nothing is unloaded.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from mymps_magic.wire.keepalive import KeepAlive, describe_keep_alive, parse_keep_alive

from .errors import Cancelled, NotFound, OutOfMemory
from .footprint import format_size

if TYPE_CHECKING:
    from .jobs import Job, JobQueue
    from .registry import Registry
    from .settings import Settings

log = logging.getLogger("kernel_server.lifetime")


class Lifetime:
    """The registry's keeper: expiry of idle models and eviction for loads that do not fit.

    Its thread sleeps until the soonest expiry, or until a load, an unload, a touch or the end
    of a job that used a model with a finite ``keep_alive`` wakes it; with every model kept
    forever (the default) it never wakes on its own.
    """

    def __init__(self, settings: Settings, registry: Registry, jobs: JobQueue) -> None:
        self.default_keep_alive = settings.keep_alive
        self._memory_limit = settings.memory_limit
        self._no_evict = settings.no_evict
        self._registry = registry
        self._jobs = jobs
        self._wake = threading.Event()
        self._closed = False
        self._watched: set[str] = set()  # ids of jobs whose end restarts a timer
        self._unloading: set[str] = set()  # models with an expiry unload queued
        self._lock = threading.Lock()
        registry.keeper = self
        self._thread = threading.Thread(target=self._run, name="mymps-lifetime", daemon=True)
        self._thread.start()

    def touch(self, name: str, keep_alive: KeepAlive | None = None) -> None:
        """A request uses ``name``: restart its timer, and set its ``keep_alive`` if given (a
        request's field, read by the wire's reader already: seconds, or any of its spellings).

        Call it once the request's job is submitted (the job keeps the model in use, so a
        ``keep_alive`` of 0 unloads it when that job ends, not before it starts). An unknown
        name is ignored: the request's own job reports it.
        """
        model = self._registry.find(name)
        if model is None:
            return
        if keep_alive is not None:
            model.keep_alive = parse_keep_alive(keep_alive)
        model.touch()
        if model.keep_alive < 0:  # kept forever (the default): nothing to watch, no thread to wake
            return
        self._watch(name, self._jobs.using(name))
        self._wake.set()

    def changed(self) -> None:
        self._wake.set()

    def free(self) -> int:
        """Bytes a load may still take: the device's free memory, within ``--memory-limit``."""
        free = self._registry.device.free()
        if self._memory_limit is not None:
            used = sum(model.bytes for model in self._registry.models())
            free = min(free, max(0, self._memory_limit - used))
        return free

    def make_room(self, name: str, needed: int) -> list[str]:
        """Unload least recently used idle models until ``needed`` bytes are free; runs inside
        the load's job, so the unloads are on the device queue too. Returns their names.

        Raises:
            OutOfMemory: even all idle models would not make room, or ``--no-evict`` forbids
                unloading them; nothing was unloaded.
        """
        free = self.free()
        if needed <= free:
            return []
        # Names, not the models: a reference held here would keep an unloaded model's memory.
        idle = [(m.name, m.bytes) for m in sorted(self._registry.models(), key=lambda m: m.last_used)
                if m.name != name and not self._jobs.using(m.name)]
        reclaimable = sum(size for _, size in idle)
        if self._no_evict or free + reclaimable < needed:
            raise OutOfMemory(self._no_room(name, needed, free, reclaimable))
        evicted = []
        for victim, _ in idle:
            if free >= needed:
                break
            free += self._registry.unload(victim, why=f"evicted to make room for {name}")
            evicted.append(victim)
        return evicted

    def _no_room(self, name: str, needed: int, free: int, reclaimable: int) -> str:
        where = self._registry.device.kind
        if self._memory_limit is not None:
            where += f" (--memory-limit {format_size(self._memory_limit)})"
        message = f"loading {name} needs {format_size(needed)} but {format_size(free)} is free on {where}"
        if self._no_evict and free + reclaimable >= needed:
            hint = "the server runs with --no-evict: unload a model (DELETE /models/NAME) to make room"
        elif reclaimable:
            hint = (f"unloading every idle model would free only {format_size(reclaimable)}: "
                    "load with a smaller dtype, or unload models that queued jobs use once they end")
        else:
            hint = "unload a model (DELETE /models/NAME) or load with a smaller dtype"
        return f"{message}; {hint}; the other models stay loaded"

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    def _run(self) -> None:
        timeout: float | None = None
        while True:
            self._wake.wait(timeout)
            self._wake.clear()
            if self._closed:
                return
            try:
                timeout = self._sweep()
            except Cancelled:  # the queue is closed: the server is stopping
                return

    def _sweep(self) -> float | None:
        """Queue the unload of each expired idle model; seconds until the next expiry, or None."""
        now = time.time()
        soonest: float | None = None
        for model in self._registry.models():
            expires = model.expires_at
            if expires is None or model.name in self._unloading:
                continue
            busy = self._jobs.using(model.name)
            if busy:
                self._watch(model.name, busy)
            elif expires <= now:
                self._unload(model.name)
            else:
                soonest = expires - now if soonest is None else min(soonest, expires - now)
        return soonest

    def _watch(self, name: str, jobs: tuple[Job, ...]) -> None:
        """Restart ``name``'s timer when each of ``jobs`` ends (once per job)."""
        for job in jobs:
            with self._lock:
                if job.id in self._watched:
                    continue
                self._watched.add(job.id)
            job.add_done_callback(self._ended(name, job.id))

    def _ended(self, name: str, job_id: str) -> Callable[[Future[Any]], None]:
        def ended(job: Future[Any]) -> None:
            with self._lock:
                self._watched.discard(job_id)
            model = self._registry.find(name)
            if model is not None:
                model.touch()
            self._wake.set()

        return ended

    def _unload(self, name: str) -> None:
        with self._lock:
            self._unloading.add(name)

        def work(job: Job) -> None:
            model = self._registry.find(name)
            if model is None:
                return
            expires, keep_alive = model.expires_at, model.keep_alive
            del model  # the unload must free it
            others = [other for other in self._jobs.using(name) if other is not job]
            if expires is None or expires > time.time() or others:
                return  # kept longer or used again since the sweep
            with contextlib.suppress(NotFound):
                self._registry.unload(name, why=f"idle for {describe_keep_alive(keep_alive)} (its keep_alive)")

        def done(job: Future[Any]) -> None:
            with self._lock:
                self._unloading.discard(name)
            self._wake.set()

        try:
            job = self._jobs.submit(work, "unload", model=name)
        except Cancelled:
            with self._lock:
                self._unloading.discard(name)
            raise
        job.add_done_callback(done)
