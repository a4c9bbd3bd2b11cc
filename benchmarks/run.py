"""The one table every benchmark reports into: a :class:`Row` per figure, printed by :func:`table`
under the machine and device it was measured on."""

from __future__ import annotations

import platform
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    """One figure, next to the baseline measured in the same run.

    Attributes:
        figure: what was measured, and how (e.g. ``gpt2: server POST /generate, greedy 128 tokens``).
        value: the figure with its unit.
        baseline: the baseline's figure, or "".
        ratio: value over baseline (``3.4x``, ``97%``), or "".
        target: what the issue or SPEC asks for, or "".
        status: ``met``, ``NOT met`` or "" when there is no target.
    """

    figure: str
    value: str
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    status: str = ""


def judged(ok: bool) -> str:
    return "met" if ok else "NOT met"


def device_line(device: str) -> str:
    """``"device: ..."``: the accelerator's name, or the CPU's."""
    if device == "cuda":
        import torch

        return f"device: cuda ({torch.cuda.get_device_name()}, torch {torch.__version__})"
    return f"device: {device} ({platform.machine()})"


def table(rows: list[Row]) -> str:
    """The rows as one Markdown table, the form ``benchmarks/README.md`` keeps."""
    lines = ["| figure | value | baseline, same run | ratio | target | status |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.figure} | {r.value} | {r.baseline} | {r.ratio} | {r.target} | {r.status} |" for r in rows]
    return "\n".join(lines)
