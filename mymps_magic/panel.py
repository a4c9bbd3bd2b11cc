"""`Panel`: the notebook's live view of the server (``%mymps status``, `Client.panel`).

One composite widget (STYLE habit 8), built once: connection and latency, versions, the device
and its memory, the loaded models with Unload buttons, a Load form with its own progress bar,
the jobs with Cancel buttons and the last errors. Each refresh updates values in place.

Nothing here blocks the kernel: a daemon thread refreshes every ``interval`` seconds and the
buttons' work runs on threads of its own, each through the panel's own `Client` connections
(never the notebook's session channel), so cells keep running while the panel talks to the
server. A refresh that fails shows "disconnected: <reason>" and the next one tries again.
"""

from __future__ import annotations

import collections
import html
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets  # type: ignore[import-untyped]  # it ships no types

from mymps_magic import _humanize, errors, wire
from mymps_magic._panelrows import JOB_COLUMNS, MODEL_COLUMNS, JobRow, LoadForm, ModelRow, RowSet

if TYPE_CHECKING:
    from mymps_magic.client import Client

DEFAULT_INTERVAL = 5.0
KEPT_ERRORS = 5


def _reason(exc: BaseException) -> str:
    """Our errors are one line already; anything else gets its type name in front."""
    return str(exc) if isinstance(exc, errors.MympsError) else f"{type(exc).__name__}: {exc}"


class Panel(widgets.VBox):  # type: ignore[misc]
    """A self-refreshing view of one server, with buttons that act on it.

    Args:
        connect: makes a new `Client` for the server to watch; the panel makes two (one for
            its refreshes, one for the buttons), so a long load never delays a refresh.
        interval: seconds between refreshes (change it later through `interval`).

    Attributes:
        refreshes: how many refreshes have been attempted (one request round each).
        errors: the last errors, newest last, as ``(unix time, message)``.
        load_form: the Load form (its ``button``, ``name``, ``kind``, ``dtype``).
        models, jobs: the tables (``rows`` maps a model name or job id to its row and button).

    Raises:
        BadRequestError: an interval that is not a positive number of seconds.
    """

    def __init__(self, connect: Callable[[], Client], interval: float = DEFAULT_INTERVAL) -> None:
        if not interval > 0:
            raise errors.BadRequestError(f"interval={interval!r}: give a positive number of seconds, e.g. 5")
        self.interval = float(interval)
        self.refreshes = 0
        self.errors: collections.deque[tuple[float, str]] = collections.deque(maxlen=KEPT_ERRORS)
        self._watch, self._act = connect(), connect()
        self._closed = threading.Event()
        self._lock = threading.Lock()  # one refresh at a time (the timer's and a button's)
        self._summary = f"Server  {self._watch.settings.address}  not refreshed yet"
        self.connection = widgets.HTML()
        self.memory_bar = widgets.FloatProgress(min=0.0, max=1.0, description="memory",
                                                layout=widgets.Layout(width="45%"))
        self.memory = widgets.Label()
        self.models: RowSet[ModelRow] = RowSet(MODEL_COLUMNS, lambda name: ModelRow(name, self.unload),
                                               lambda m: str(m.get("name")), "No models loaded.")
        self.load_form = LoadForm(self.load)
        self.jobs: RowSet[JobRow] = RowSet(JOB_COLUMNS, lambda job_id: JobRow(job_id, self.cancel),
                                           lambda j: str(j.get("id")), "No jobs.")
        self.error_list = widgets.HTML()
        super().__init__([
            self.connection,
            widgets.HBox([self.memory_bar, self.memory]),
            widgets.HTML("<b>Models</b>"), self.models, self.load_form,
            widgets.HTML("<b>Jobs</b>"), self.jobs,
            self.error_list,
        ], layout=widgets.Layout(border="1px solid #ccc", padding="6px"))
        self.add_class("mymps-panel")  # for style sheets and browser tests to find it
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="mymps-panel", daemon=True)
        self._thread.start()

    # -- refreshing --------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._closed.wait(self.interval):
            self.refresh()

    def refresh(self) -> None:
        """Ask the server for its state now and show it; a failure shows as "disconnected"."""
        with self._lock:
            if self._closed.is_set():
                return
            self.refreshes += 1
            try:
                started = time.perf_counter()
                health = self._watch.health()
                latency_ms = (time.perf_counter() - started) * 1e3
                stats, models, jobs = self._watch.stats(), self._watch.models(), self._watch.jobs()
            except Exception as exc:  # whatever a refresh meets is shown, never raised into the kernel
                if not self._closed.is_set():
                    self._disconnected(_reason(exc))
                return
            self._show(health, latency_ms, stats, models, jobs)

    def _show(self, health: dict[str, Any], latency_ms: float, stats: dict[str, Any],
              models: list[dict[str, Any]], jobs: list[dict[str, Any]]) -> None:
        address = self._watch.settings.address
        device = stats.get("device", {})
        self.connection.value = (
            f"<span style='color:#1a7f37'>&#9679; connected</span> to <b>{html.escape(address)}</b>"
            f" &middot; {latency_ms:.1f} ms round trip &middot; mymps {html.escape(str(health.get('version')))}"
            f" &middot; {html.escape(str(device.get('kind')))} ({html.escape(str(device.get('name')))})")
        allocated, total, driver = device.get("allocated"), device.get("total"), device.get("driver")
        fraction = allocated / total if allocated is not None and total else 0.0
        self.memory_bar.value = min(1.0, fraction)
        self.memory_bar.bar_style = "danger" if fraction > 0.95 else "warning" if fraction > 0.8 else "info"
        memory = f"{_humanize.size(allocated)} allocated of {_humanize.size(total)} ({100 * fraction:.0f}%)"
        if driver is not None:
            memory += f", {_humanize.size(driver)} in use by the driver"
        self.memory.value = memory
        self.models.sync(models)
        self.jobs.sync(jobs)
        names = ", ".join(f"{m.get('name')} ({_humanize.size(m.get('bytes'))})" for m in models) or "none"
        counts = stats.get("jobs", {})
        self._summary = (f"Server  {address}  mymps {health.get('version')}  ({latency_ms:.1f} ms round trip)\n"
                         f"device  {device.get('kind')} ({device.get('name')}): {memory}\n"
                         f"models  {names}\n"
                         f"jobs    {counts.get('running', 0)} running, {counts.get('queued', 0)} queued")

    def _disconnected(self, reason: str) -> None:
        self.connection.value = (f"<span style='color:#cf222e'>&#9679; disconnected: {html.escape(reason)}</span>"
                                 f" (retrying every {self.interval:g} s)")
        self._summary = f"Server  {self._watch.settings.address}  disconnected: {reason}"
        if not self.errors or self.errors[-1][1] != f"disconnected: {reason}":
            self._note(f"disconnected: {reason}")

    def _note(self, message: str) -> None:
        self.errors.append((time.time(), message))
        items = "".join(f"<li>{html.escape(_humanize.ago(t))}: {html.escape(m)}</li>" for t, m in self.errors)
        self.error_list.value = f"<b>Last errors</b><ul style='margin:0'>{items}</ul>"

    # -- the buttons ---------------------------------------------------------------------------------

    def unload(self, name: str) -> None:
        """Unload ``name`` on a thread (what the Unload buttons call); the panel refreshes after."""
        self._in_background(f"unload {name}", lambda: self._act.unload_model(name))

    def cancel(self, job_id: str) -> None:
        """Cancel job ``job_id`` on a thread (what the Cancel buttons call)."""
        self._in_background(f"cancel {job_id}", lambda: self._act.cancel(job_id))

    def load(self, request: wire.LoadRequest) -> None:
        """Load a model on a thread, its progress in the Load form (what the Load button calls)."""
        self._in_background(f"load {request.name}", lambda: self._load(request))

    def _load(self, request: wire.LoadRequest) -> None:
        def show(event: wire.ProgressEvent) -> None:  # the form's bar, not tqdm's
            self.load_form.progress(event.progress, event.message or event.stage)

        try:
            final = self._act.load_model(request.name, None if request.kind == wire.DETECT else request.kind,
                                         request.dtype, path=request.path, model_class=request.model_class,
                                         trust_remote_code=request.trust_remote_code, progress=show)
        except Exception as exc:
            self.load_form.finished(f"failed: {_reason(exc)}", failed=True)
            raise
        word = "was already loaded" if final.get("already_loaded") else \
            f"loaded ({final.get('dtype')}) in {final.get('load_time_s', 0):.1f} s"
        self.load_form.finished(f"{request.name} {word}")

    def _in_background(self, what: str, call: Callable[[], object]) -> None:
        def work() -> None:
            try:
                call()
            except Exception as exc:  # a button's failure goes to the error list, not the kernel
                self._note(f"{what}: {_reason(exc)}")
            self.refresh()

        threading.Thread(target=work, name=f"mymps-panel-{what}", daemon=True).start()

    # -- display and closing -----------------------------------------------------------------------

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any] | None:
        """The widget, with the last refresh as plain text for front ends that show no widgets."""
        bundle: dict[str, Any] | None = super()._repr_mimebundle_(**kwargs)
        if bundle is not None:
            bundle["text/plain"] = self._summary
        return bundle

    def __repr__(self) -> str:
        return f"<mymps Panel of {self._watch.settings.address}, every {self.interval:g} s>"

    def close(self) -> None:
        """Stop refreshing, close the panel's connections and take the widget off the page."""
        self._closed.set()
        with self._lock:  # a refresh under way ends first
            self._watch.close()
        self._act.close()
        for widget in _descendants(self):
            widget.close()
        super().close()


def _descendants(box: widgets.Box) -> list[widgets.Widget]:
    found: list[widgets.Widget] = []
    for child in box.children:
        if isinstance(child, widgets.Box):
            found.extend(_descendants(child))
        found.append(child)
    return found
