"""How much memory a model will take once loaded, read from its files before loading it.

The registry compares this with the device's free memory before it loads anything, so that a load
that cannot fit unloads idle models first (``lifetime.py``) or fails with a 507 that says how much
it needs, instead of the allocator failing halfway. Safetensors files say each tensor's dtype and
shape in their header, so their figure is exact for the dtype the model is loaded in; other
weight files count as their size on disk.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_STORED_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                 "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
_OTHER_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
_MAX_HEADER = 100 * 1024**2  # the safetensors format's own limit


def estimate(source: str, element_size: int) -> int | None:
    """Bytes the weights at ``source`` take with floating tensors of ``element_size`` bytes each.

    Args:
        source: a file, a directory of weights (subfolders too, as diffusers pipelines keep
            them), or a hub id already in the local cache.
        element_size: bytes per element of the dtype the model is loaded in.

    Returns:
        The estimate, or None when no weights are found locally (a hub id not yet downloaded):
        the load then goes ahead and only the allocator can say it does not fit.
    """
    path = _local(source)
    if path is None:
        return None
    if path.is_file():
        return _file_bytes(path, element_size)
    files = _weight_files(path)
    if not files:
        return None
    return sum(_file_bytes(file, element_size) for file in files)


def _local(source: str) -> Path | None:
    path = Path(source).expanduser()
    if path.exists():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception:  # not in the cache, or not a hub id at all: nothing to measure
        return None


def _weight_files(directory: Path) -> list[Path]:
    """The weights in ``directory`` and its subfolders: safetensors where a folder has them, else
    the other weight files (a folder holding both formats loads one of them, not both)."""
    found: list[Path] = []
    folders = {directory} | {p for p in directory.rglob("*") if p.is_dir() and not p.name.startswith(".")}
    for folder in folders:
        safetensors = sorted(folder.glob("*.safetensors"))
        found += safetensors or [f for pattern in _OTHER_WEIGHTS for f in sorted(folder.glob(pattern))]
    return [f for f in found if f.is_file()]


def _file_bytes(path: Path, element_size: int) -> int:
    if path.suffix != ".safetensors":
        return path.stat().st_size
    try:
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > _MAX_HEADER:
                return path.stat().st_size
            header = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error):
        return path.stat().st_size
    total = 0
    for name, tensor in header.items():
        if name == "__metadata__" or not isinstance(tensor, dict):
            continue
        dtype = str(tensor.get("dtype"))
        count = math.prod(int(n) for n in tensor.get("shape", []))
        total += count * (element_size if dtype in _FLOAT_DTYPES else _STORED_BYTES.get(dtype, element_size))
    return total


def format_size(size: float) -> str:
    """``3328599654`` -> ``"3.1 GiB"``: sizes in the one-line errors, in binary units as the options take them."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
