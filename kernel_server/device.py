"""Choosing the device (mps, then cuda, then cpu) and reading its memory from its own API."""

from __future__ import annotations

import os
import platform
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

import psutil
import torch

from .errors import DeviceError


@dataclass(frozen=True)
class Device:
    """The one device this server runs its work on."""

    kind: str
    name: str
    torch_device: torch.device

    def memory(self) -> dict[str, int]:
        """Allocated, driver and total bytes, as the device itself reports them.

        On mps ``total`` is Metal's recommended working-set size (the practical limit), on cuda
        the card's memory, on cpu the system RAM.
        """
        if self.kind == "mps":
            return {
                "allocated": int(torch.mps.current_allocated_memory()),
                "driver": int(torch.mps.driver_allocated_memory()),
                "total": int(torch.mps.recommended_max_memory()),
            }
        if self.kind == "cuda":
            index = self.torch_device.index or 0
            free, total = torch.cuda.mem_get_info(index)
            return {
                "allocated": int(torch.cuda.memory_allocated(index)),
                "driver": int(total - free),
                "total": int(total),
            }
        vm = psutil.virtual_memory()
        process = psutil.Process().memory_info().rss
        return {"allocated": int(process), "driver": int(vm.total - vm.available), "total": int(vm.total)}

    def free(self) -> int:
        """Bytes a new model can still take: what the driver has not handed out on mps and cuda
        (of Metal's recommended working set, of the card), the available RAM on cpu."""
        if self.kind == "cpu":
            return int(psutil.virtual_memory().available)
        figures = self.memory()
        return max(0, figures["total"] - figures["driver"])

    def describe(self) -> dict[str, Any]:
        """Kind, name and memory figures in one dict, as ``/stats`` reports the device."""
        return {"kind": self.kind, "name": self.name, **self.memory()}

    def free_memory(self) -> None:
        """Give cached blocks back to the device after an unload or a failed job."""
        if self.kind == "mps":
            torch.mps.empty_cache()
        elif self.kind == "cuda":
            torch.cuda.empty_cache()

    def default_dtype(self) -> torch.dtype:
        return torch.float32 if self.kind == "cpu" else torch.float16


def available() -> list[str]:
    kinds = []
    if torch.backends.mps.is_available():
        kinds.append("mps")
    if torch.cuda.is_available():
        kinds.append("cuda")
    return [*kinds, "cpu"]


def select_device(requested: str = "auto", environ: MutableMapping[str, str] | None = None) -> Device:
    """Pick ``requested``, or with ``auto`` the best of mps, cuda, cpu.

    On mps, ``PYTORCH_ENABLE_MPS_FALLBACK=1`` is set unless the user chose a value, so operators
    Metal lacks run on the CPU instead of failing the user's code.

    Raises:
        DeviceError: ``requested`` is not available on this machine.
    """
    kinds = available()
    kind = kinds[0] if requested == "auto" else requested
    if kind not in kinds:
        raise DeviceError(f"device {requested!r} is not available here; available: {', '.join(kinds)}")
    if kind == "mps":
        env = os.environ if environ is None else environ
        env.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
        name = f"Apple {platform.machine()} (mps)"
        return Device("mps", name, torch.device("mps"))
    if kind == "cuda":
        return Device("cuda", torch.cuda.get_device_name(0), torch.device("cuda", 0))
    return Device("cpu", platform.processor() or platform.machine() or "cpu", torch.device("cpu"))
