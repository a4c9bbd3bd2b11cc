"""What a benchmark ran on, and whether something else was eating the CPU meanwhile.

Latency and throughput on a 2-core machine move by 2x when another process runs: each script
prints this line first, so a figure taken on a busy machine is recognisable as such.
"""

from __future__ import annotations

import os
import platform

import psutil


def machine_line(sample_s: float = 1.0) -> str:
    """``"machine: ..."`` with cores, CPU model, Python and how busy the CPUs were just now."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    busy = psutil.cpu_percent(interval=sample_s)
    line = (f"machine: {os.cpu_count()} cores ({model}), Python {platform.python_version()}, "
            f"CPU busy {busy:.0f}% before starting")
    if busy > 15:
        line += "  <- something else is running: figures will be slower and noisier than on a quiet machine"
    return line
