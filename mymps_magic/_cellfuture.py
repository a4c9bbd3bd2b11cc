"""`CellFuture`: a remote cell that runs while the notebook goes on (``%%mymps --noblock``).

Its output is kept rather than shown (`_keptoutput.KeptOutput`), so that it appears once, under
the cell that asks for it (``%mymps wait``, ``display_outputs``), not under whichever cell
happens to run when it arrives. ipyparallel's ``AsyncResult`` is the model.
"""

from __future__ import annotations

from mymps_magic._keptoutput import OutputFuture
from mymps_magic.display import RemoteValue


class CellFuture(OutputFuture[RemoteValue | None]):
    """A remote cell started by `Client.submit_cell`: a ``concurrent.futures.Future`` of the
    cell's `RemoteValue` (None when the cell ends without a value), plus its output
    (``outputs``, ``display_outputs(wait)``).

    ``result(timeout)`` raises the cell's `RemoteError` if it raised; ``cancel()`` returns False
    (the cell is sent at once: stop it with `Client.interrupt`).

    Args:
        number: the session request that runs the cell; its repr shows it.
    """

    def __init__(self, number: int) -> None:
        super().__init__()
        self.number = number

    def __repr__(self) -> str:
        if not self.done():
            state = "running"
        elif self.cancelled():
            state = "cancelled"
        else:
            error = self.exception()
            state = "done" if error is None else f"failed ({getattr(error, 'ename', type(error).__name__)})"
        return f"<remote cell {self.number}: {state}>"
