"""The panel's parts that hold rows and forms: `RowSet` (a table whose rows are kept by key),
`ModelRow`, `JobRow` and `LoadForm`.

A row is made once for each model or job the server reports and updated in place on every
refresh; only a model or job that comes or goes changes a table's children, so the widgets a
user is about to click are never swapped under the mouse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import ipywidgets as widgets  # type: ignore[import-untyped]  # it ships no types

from mymps_magic import _humanize, wire

MODEL_COLUMNS = (("name", "28%"), ("kind", "10%"), ("dtype", "10%"), ("size", "10%"),
                 ("loaded", "13%"), ("last used", "13%"))
JOB_COLUMNS = (("id", "16%"), ("kind", "9%"), ("state", "9%"), ("session", "10%"), ("model", "22%"),
               ("progress", "9%"), ("age", "9%"))
BUTTON_WIDTH = "90px"


def _cells(columns: Sequence[tuple[str, str]]) -> list[widgets.Label]:
    return [widgets.Label(layout=widgets.Layout(width=width, overflow="hidden")) for _, width in columns]


def header(columns: Sequence[tuple[str, str]]) -> widgets.HBox:
    """A table's bold column names, lined up with its rows' cells."""
    cells = [widgets.HTML(f"<b>{title}</b>", layout=widgets.Layout(width=width)) for title, width in columns]
    return widgets.HBox(cells)


class _Row(widgets.HBox):  # type: ignore[misc]
    """Labels for the columns and one button acting on the row's key."""

    def __init__(self, key: str, columns: Sequence[tuple[str, str]], button: str,
                 act: Callable[[str], None]) -> None:
        self.key = key
        self.cells = _cells(columns)
        self.button = widgets.Button(description=button, button_style="warning",
                                     layout=widgets.Layout(width=BUTTON_WIDTH))
        self.button.on_click(lambda _button: act(self.key))
        super().__init__([*self.cells, self.button])

    def show(self, values: Sequence[str]) -> None:
        for cell, value in zip(self.cells, values, strict=True):
            cell.value = value  # traitlets send nothing when the value is unchanged


class ModelRow(_Row):
    """A loaded model: name, kind, dtype, size and times, with its Unload button."""

    def __init__(self, name: str, unload: Callable[[str], None]) -> None:
        super().__init__(name, MODEL_COLUMNS, "Unload", unload)

    def update(self, model: dict[str, Any]) -> None:
        self.show([str(model.get("name", "")), str(model.get("kind", "")), str(model.get("dtype", "")),
                   _humanize.size(model.get("bytes")), _humanize.ago(model.get("loaded_at")),
                   _humanize.ago(model.get("last_used")) or "never"])


class JobRow(_Row):
    """A running or queued job, with its Cancel button."""

    def __init__(self, job_id: str, cancel: Callable[[str], None]) -> None:
        super().__init__(job_id, JOB_COLUMNS, "Cancel", cancel)

    def update(self, job: dict[str, Any]) -> None:
        progress = job.get("progress")
        self.show([str(job.get("id", "")), str(job.get("kind", "")), str(job.get("state", "")),
                   str(job.get("session") or "")[:8], str(job.get("model") or ""),
                   "" if progress is None else f"{100 * progress:.0f}%",
                   _humanize.ago(job.get("submitted")).removesuffix(" ago")])


R = TypeVar("R", ModelRow, JobRow)


class RowSet(widgets.VBox, Generic[R]):  # type: ignore[misc]
    """A table of rows kept by key: `sync` updates the rows it has, adds new ones, drops gone ones.

    Args:
        columns: the column titles and widths.
        make: builds the row for a new key.
        key: the key of an item the server reports.
        empty: the line shown when there are no rows.
    """

    def __init__(self, columns: Sequence[tuple[str, str]], make: Callable[[str], R],
                 key: Callable[[dict[str, Any]], str], empty: str) -> None:
        self.rows: dict[str, R] = {}
        self._make: Callable[[str], R] = make
        self._key: Callable[[dict[str, Any]], str] = key
        self._header = header(columns)
        self._empty = widgets.Label(empty)
        self._shown: list[widgets.Widget] = [self._empty]
        super().__init__(self._shown)

    def sync(self, items: Sequence[dict[str, Any]]) -> None:
        keys: list[str] = [self._key(item) for item in items]
        for gone in set(self.rows) - set(keys):
            self.rows.pop(gone).close()
        for key, item in zip(keys, items, strict=True):
            if key not in self.rows:
                self.rows[key] = self._make(key)
            self.rows[key].update(item)
        children: list[widgets.Widget] = [self._header, *(self.rows[k] for k in keys)] if keys else [self._empty]
        if children != self._shown:
            self._shown = children
            self.children = children


class LoadForm(widgets.VBox):  # type: ignore[misc]
    """Name, kind and dtype, a Load button, and the load's own progress bar and last word.

    Args:
        load: called with the request when the button is clicked (it must not block: the
            panel runs the load on a thread and reports through `progress` and `finished`).
    """

    def __init__(self, load: Callable[[wire.LoadRequest], None]) -> None:
        self._load = load
        self.name = widgets.Text(placeholder="hub id or path on the server", description="Load",
                                 layout=widgets.Layout(width="45%"))
        self.kind = widgets.Dropdown(options=[("detect", wire.DETECT), *((k, k) for k in wire.KINDS)],
                                     value=wire.DETECT, description="kind", layout=widgets.Layout(width="20%"))
        self.dtype = widgets.Dropdown(options=list(wire.DTYPES), value="auto", description="dtype",
                                      layout=widgets.Layout(width="20%"))
        self.button = widgets.Button(description="Load", button_style="primary",
                                     layout=widgets.Layout(width=BUTTON_WIDTH))
        self.button.on_click(lambda _button: self.submit())
        self.bar = widgets.FloatProgress(min=0.0, max=1.0, layout=widgets.Layout(width="45%", visibility="hidden"))
        self.message = widgets.Label()
        super().__init__([widgets.HBox([self.name, self.kind, self.dtype, self.button]),
                          widgets.HBox([self.bar, self.message])])

    def submit(self) -> None:
        name = self.name.value.strip()
        if not name:
            self.message.value = "Give a model name (a hub id or a path on the server)."
            return
        self.button.disabled = True
        self.progress(0.0, "starting")
        self._load(wire.LoadRequest(name, str(self.kind.value), str(self.dtype.value)))

    def progress(self, fraction: float, message: str) -> None:
        self.bar.layout.visibility = "visible"
        self.bar.bar_style = ""
        self.bar.value = fraction
        self.message.value = message

    def finished(self, message: str, failed: bool = False) -> None:
        if not failed:
            self.bar.value = 1.0
        self.bar.bar_style = "danger" if failed else "success"
        self.message.value = message
        self.button.disabled = False
