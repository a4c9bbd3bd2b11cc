"""`CellFuture`: a remote cell that runs while the notebook goes on (``%%mymps --noblock``).

Its output is kept rather than shown (`display.KeptOutput`), so that it appears once, under the
cell that asks for it (``%mymps wait``, `CellFuture.display_outputs`), not under whichever cell
happens to run when it arrives. ipyparallel's ``AsyncResult`` is the model.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

from mymps_magic.display import KeptOutput, OutputSink, RemoteValue

_WAIT_STEP_S = 0.2


class CellFuture(concurrent.futures.Future[RemoteValue | None]):
    """A remote cell started by `Client.submit_cell`: a ``concurrent.futures.Future`` of the
    cell's `RemoteValue` (None when the cell ends without a value), plus its output.

    ``result(timeout)`` raises the cell's `RemoteError` if it raised; ``cancel()`` returns False
    (the cell is sent at once: stop it with `Client.interrupt`).

    Args:
        number: the session request that runs the cell; its repr shows it.
    """

    def __init__(self, number: int) -> None:
        super().__init__()
        self.number = number
        self.kept = KeptOutput()

    @property
    def outputs(self) -> list[tuple[str, Any]]:
        """What arrived so far, in order: ``("stdout" | "stderr", text)`` and ``("display",
        {"data": mimebundle, "metadata": ...})`` items (progress bars are not kept)."""
        return self.kept.merged()

    def display_outputs(self, wait: bool = False) -> None:
        """Show the output that arrived so far here, as the cell itself would have shown it.

        Args:
            wait: also show what arrives after, as it comes, until the cell ends.
        """
        sink = OutputSink()
        shown = 0
        while True:
            done = self.done()  # read first: all output is kept before the cell counts as done
            shown = self.kept.show(sink, shown)
            if done or not wait:
                return
            self.kept.wait_for_more(shown, _WAIT_STEP_S)

    def __repr__(self) -> str:
        if not self.done():
            state = "running"
        elif self.cancelled():
            state = "cancelled"
        else:
            error = self.exception()
            state = "done" if error is None else f"failed ({getattr(error, 'ename', type(error).__name__)})"
        return f"<remote cell {self.number}: {state}>"
