"""``%mymps on``: every following cell runs remotely until ``%mymps off`` (ipyparallel's ``%autopx``).

An IPython input transformer turns each cell into a ``%%mymps`` cell before IPython reads its
magics, so the cell runs exactly as if the user had typed ``%%mymps`` above it. It stays in place
whatever a cell raises, and only ``%mymps off`` removes it. Cells that start with ``%mymps`` or
``%%mymps`` run as written: that keeps ``%mymps off`` (and ``wait``, ``push``, ``pull``) local.
"""

from __future__ import annotations

from typing import Any

from IPython.display import display

_MAGIC_PREFIXES = ("%mymps", "%%mymps")


class RemoteMode:
    """Whether one IPython shell sends every cell to the server, and the transformer that does it.

    Args:
        shell: the IPython shell whose cells are rewritten.
    """

    def __init__(self, shell: Any) -> None:
        self._shell = shell

    @property
    def on(self) -> bool:
        return self._transform in self._shell.input_transformers_cleanup

    def start(self) -> None:
        if not self.on:
            # Last among the clean-up transforms: after IPython strips leading blank lines and
            # indentation, before it turns %% lines into magic calls.
            self._shell.input_transformers_cleanup.append(self._transform)

    def stop(self) -> None:
        if self.on:
            self._shell.input_transformers_cleanup.remove(self._transform)

    @staticmethod
    def _transform(lines: list[str]) -> list[str]:
        first = next((line.lstrip() for line in lines if line.strip()), "")
        if not first or first.startswith(_MAGIC_PREFIXES):
            return lines
        return ["%%mymps\n", *lines]


def show_marker(address: str) -> None:
    """The line at the top of each cell that ``%mymps on`` ran remotely, so the notebook shows
    where each cell ran."""
    text = f"[mymps] ran remotely on {address}"
    display({"text/plain": text, "text/html": f'<small style="color: #888">{text}</small>'}, raw=True)
