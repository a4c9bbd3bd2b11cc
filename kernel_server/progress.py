"""Progress of long device work, taken from the libraries' own tqdm bars.

A diffusers pipeline's denoising steps and transformers' loop over the tensors it loads each
drive a tqdm bar. `Steps` stands in for such a bar: every step reports how far the job is and is
a point where a cancelled job stops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any


class Steps:
    """Stands in for a library's tqdm bar: both ways libraries use one (iterate, or ``with`` and
    ``update()``) report progress and stop a cancelled job at the next step."""

    def __init__(self, iterable: Iterable[Any] | None, total: int | None,
                 check_cancelled: Callable[[], None], on_progress: Callable[[float], None]) -> None:
        self.items = list(iterable) if iterable is not None else []
        self.total = max(1, len(self.items) if iterable is not None else (total or 1))
        self.done = 0
        self.check_cancelled = check_cancelled
        self.on_progress = on_progress

    def __iter__(self) -> Iterator[Any]:
        for item in self.items:
            self.check_cancelled()
            yield item
            self.update()

    def update(self, n: int = 1) -> None:
        self.done += n
        self.on_progress(min(1.0, self.done / self.total))
        self.check_cancelled()

    def __enter__(self) -> Steps:
        self.check_cancelled()
        return self

    def __exit__(self, *exc: object) -> None:
        return None
