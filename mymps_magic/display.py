"""Turning remote output, displays and progress into local ones.

In a Jupyter kernel, stream text goes to ``sys.stdout``/``sys.stderr`` (which the kernel turns
into ``stream`` messages), displays go through IPython's display machinery as raw mimebundles,
and progress bars are ``tqdm.auto`` bars (widgets where ipywidgets is installed). Outside a
kernel the same calls print text and draw text bars.

Output that arrives after its cell ended (that of a call ``submit`` sent) still belongs to that
cell: `cell_parent` names the cell that sends a request, and `shown_under` makes ipykernel publish
what is shown meanwhile under that cell's message, whichever cell runs when it arrives.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

from mymps_magic import errors


def _ipython_shell() -> Any:
    """The running IPython shell, without importing IPython when the user has not."""
    if "IPython" not in sys.modules:
        return None
    from IPython import get_ipython

    return get_ipython()


def in_kernel() -> bool:
    shell = _ipython_shell()
    return shell is not None and getattr(shell, "kernel", None) is not None


def cell_parent() -> dict[str, Any] | None:
    """The message of the cell running now on this thread (its ``execute_request``), which output
    belongs under; None outside a kernel."""
    shell = _ipython_shell()
    kernel = getattr(shell, "kernel", None)
    if kernel is None:
        return None
    parent: dict[str, Any] = kernel.get_parent()
    return parent or None


@contextlib.contextmanager
def shown_under(parent: dict[str, Any]) -> Iterator[None]:
    """Publish what this thread shows in this block (stream text, displays, progress bars) under
    the cell of ``parent`` (a `cell_parent`), not under whichever cell runs now.

    ipykernel 7 keeps a per-thread parent on its output streams and display publisher
    (``set_thread_parent``) and buffers each parent's text apart; where there is none (an older
    kernel, a stream the user swapped in) output shows under the current cell as before.
    """
    shell = _ipython_shell()
    routed: list[tuple[Any, Any]] = []
    for target in (sys.stdout, sys.stderr, getattr(shell, "display_pub", None)):
        set_thread_parent = getattr(target, "set_thread_parent", None)
        if set_thread_parent is not None:
            routed.append((target, set_thread_parent(parent)))
    try:
        yield
    finally:
        for target, token in reversed(routed):
            target.reset_thread_parent(token)


class RemoteValue:
    """A remote cell's last value, shown through the rich repr the server made of it.

    `Client.run_cell_rich` and ``%%mymps`` return it; `Client.run_cell` returns it for a value
    that is not plain data (a model, ``DEVICE``, a tensor where this side has no torch). Such a
    value stays on the server (as ``_`` there) and ``fetch()`` moves it here when asked.

    Args:
        mime: the server's mimebundle of the value (``text/plain`` at least).
        value: the value itself, where it was plain data and came with its repr.
        reason: why the value did not come back (empty when it did).
        handle: the name the server keeps the value under (``_N``, N the cell's number there).
        pull: gets one name's value from the session (`fetch` calls it with ``handle``).
    """

    def __init__(self, mime: dict[str, Any], value: Any = None, reason: str = "", handle: str = "",
                 pull: Callable[[str], Any] | None = None) -> None:
        self.mime = mime
        self.value = value
        self.reason = reason
        self.handle = handle
        self._pull = pull

    @property
    def arrived(self) -> bool:
        """Whether ``value`` holds the object itself, rather than None for one left remote."""
        return not self.reason

    def fetch(self) -> Any:
        """The object itself: ``value`` where it arrived, else moved from the server now (it
        stays there too). The server keeps the values of its last three cells (``_``, ``__``,
        ``___``); assign an older one to a name and `Client.pull` that.

        Raises:
            RemoteNameError: the server no longer keeps the value.
            PicklingError: the value cannot be pickled there or unpickled here.
        """
        if self.arrived:
            return self.value
        if self._pull is None or not self.handle:
            raise errors.RemoteNameError("this remote value was not kept on the server; assign it to a name in a "
                                         "cell and pull that name")
        try:
            return self._pull(self.handle)
        except errors.RemoteNameError:
            raise errors.RemoteNameError(
                f"the value of remote cell {self.handle.lstrip('_')} is no longer kept on the server (only the last "
                "three are: _, __, ___); assign it to a name in a cell and pull that name") from None

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return dict(self.mime)

    def __repr__(self) -> str:
        return str(self.mime.get("text/plain", f"<remote value: {self.reason}>"))


class OutputSink:
    """Renders one client's remote output; progress bars are kept per (request, bar).

    ``request`` names the session request an output belongs to (0: none).
    """

    def __init__(self) -> None:
        self._bars: dict[tuple[int, int], Any] = {}

    def stream(self, name: str, text: str, request: int = 0) -> None:
        target = sys.stderr if name == "stderr" else sys.stdout
        target.write(text)
        target.flush()

    def display(self, data: dict[str, Any], metadata: dict[str, Any] | None = None, request: int = 0) -> None:
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

