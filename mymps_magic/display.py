"""Turning remote output, displays and progress into local ones.

In a Jupyter kernel, stream text goes to ``sys.stdout``/``sys.stderr`` (which the kernel turns
into ``stream`` messages), displays go through IPython's display machinery as raw mimebundles,
and progress bars are ``tqdm.auto`` bars (widgets where ipywidgets is installed). Outside a
kernel the same calls print text and draw text bars.
"""

from __future__ import annotations

import sys
from typing import Any

def _ipython_shell() -> Any:
    """The running IPython shell, without importing IPython when the user has not."""
    if "IPython" not in sys.modules:
        return None
    from IPython import get_ipython

    return get_ipython()


def in_kernel() -> bool:
    shell = _ipython_shell()
    return shell is not None and getattr(shell, "kernel", None) is not None


class RemoteValue:
    """A remote cell's last value, shown through the rich repr the server made of it.

    `Client.run_cell_rich` and ``%%mymps`` return it, so the notebook shows a remote image or
    table even when the object itself cannot travel; `Client.run_cell` returns it only then.

    Args:
        mime: the server's mimebundle of the value (``text/plain`` at least).
        value: the value itself, where it was pickled there and unpickled here.
        reason: why the value did not come back (empty when it did).
    """

    def __init__(self, mime: dict[str, Any], value: Any = None, reason: str = "") -> None:
        self.mime = mime
        self.value = value
        self.reason = reason

    @property
    def arrived(self) -> bool:
        """Whether ``value`` holds the object itself, rather than None for one left remote."""
        return not self.reason

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return dict(self.mime)

    def __repr__(self) -> str:
        return str(self.mime.get("text/plain", f"<remote value: {self.reason}>"))


class OutputSink:
    """Renders one client's remote output; progress bars are kept per (request, bar)."""

    def __init__(self) -> None:
        self._bars: dict[tuple[int, int], Any] = {}

    def stream(self, name: str, text: str) -> None:
        target = sys.stderr if name == "stderr" else sys.stdout
        target.write(text)
        target.flush()

    def display(self, data: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        if in_kernel():
            from IPython.display import publish_display_data

            publish_display_data(data, metadata or {})
            return
        text = data.get("text/plain")
        if text is None:
            kinds = ", ".join(data)
            text = f"<display: {kinds}>"
        print(text)

    def progress(self, request: int, fields: dict[str, Any]) -> None:
        key = (request, int(fields.get("bar", 0)))
        bar = self._bars.get(key)
        if bar is None:
            if fields.get("closed"):
                return
            from tqdm.auto import tqdm

            bar = self._bars[key] = tqdm(total=fields.get("total"), desc=fields.get("desc") or None,
                                         unit=fields.get("unit") or "it", leave=True)
        total = fields.get("total")
        if total != bar.total:
            bar.total = total
        if fields.get("desc") and fields["desc"] != bar.desc:
            bar.set_description(fields["desc"], refresh=False)
        bar.n = int(fields.get("n", 0))
        if fields.get("closed"):
            bar.close()
            del self._bars[key]
        else:
            bar.refresh()

    def finish(self, request: int) -> None:
        """Close the bars of a request that ended without closing them (an error, say)."""
        for key in [k for k in self._bars if k[0] == request]:
            self._bars.pop(key).close()

