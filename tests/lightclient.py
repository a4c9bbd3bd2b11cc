"""The light client as the README installs it: a venv with only ``pip install .`` and ipykernel.

The project's own venv has torch and everything the server needs, so a kernel started from it
cannot show what a user with only the client sees (issue 12: a last value that needs torch to
unpickle, text progress bars without ipywidgets). This venv has the package's dependencies and
nothing else, plus a kernelspec of its own: jupyter_client 8 ignores ``kernel_cmd``, so a kernel
on another interpreter is started by naming its kernelspec.

Building it takes about half a minute (a wheel of the project, then the dependencies from the
local package index), so it is kept under the repository's git-ignored ``.venv-light/``, in a
folder named by the hash of ``pyproject.toml``: a rerun reuses it, and any change to that file
(to the dependencies, say) builds a fresh one. Kernels put the repository on ``PYTHONPATH``, as
the other test kernels do, so they run the working tree's client code, not the wheel's copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from notebook_kernel import Kernel, ok
from kit import REPO_ROOT, ServerProcess

__all__ = ["KERNEL_NAME", "LIGHT_ROOT", "LightVenv", "light_notebook", "light_venv"]

LIGHT_ROOT = REPO_ROOT / ".venv-light"
KERNEL_NAME = "mymps-light"


@dataclass(frozen=True)
class LightVenv:
    """A built light-client venv: its interpreter and its kernelspec folder."""

    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def spec(self) -> Path:
        """The kernelspec folder (``.../kernels/mymps-light``), for `kernels.Kernel`'s ``spec``."""
        return self.root / "share" / "jupyter" / "kernels" / KERNEL_NAME


def light_venv() -> LightVenv:
    """The light-client venv for the current ``pyproject.toml``, built if it is not there yet.

    Built in a scratch folder and renamed into place when complete, so an interrupted build or two
    test runs building at once never leave a half-made venv where the next run would use it.

    Raises:
        RuntimeError: pip failed; the message ends with pip's output.
    """
    digest = hashlib.sha256((REPO_ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    venv = LightVenv(LIGHT_ROOT / digest)
    if venv.spec.is_dir():
        return venv
    print(f"\nBuilding the light-client venv {venv.root} (pip install . ipykernel, about 30 s, once)...",
          file=sys.stderr, flush=True)
    LIGHT_ROOT.mkdir(exist_ok=True)
    scratch = LightVenv(Path(tempfile.mkdtemp(prefix=f"{digest}-building-", dir=LIGHT_ROOT)))
    try:
        _build(scratch, final=venv)
        os.rename(scratch.root, venv.root)
    except OSError:
        if not venv.spec.is_dir():  # another run renamed its build into place first: use that one
            raise
    finally:
        shutil.rmtree(scratch.root, ignore_errors=True)
    for stale in LIGHT_ROOT.iterdir():
        if stale.name != digest and "-building-" not in stale.name:
            shutil.rmtree(stale, ignore_errors=True)
    return venv


def _build(venv: LightVenv, final: LightVenv) -> None:
    """Create the venv in ``venv.root`` with a kernelspec naming ``final``'s interpreter, where it
    will live once renamed (the venv's own interpreter finds its prefix relative to itself)."""
    steps = [
        [sys.executable, "-m", "venv", str(venv.root)],
        [str(venv.python), "-m", "pip", "install", "--no-input", "--quiet", str(REPO_ROOT), "ipykernel"],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, cwd=tempfile.gettempdir(), check=False)
        if done.returncode != 0:
            raise RuntimeError(f"Building the light-client venv failed: {' '.join(step)}\n{done.stdout}{done.stderr}")
    venv.spec.mkdir(parents=True)
    (venv.spec / "kernel.json").write_text(json.dumps({
        "argv": [str(final.python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (mymps light client)",
        "language": "python",
    }))


@contextlib.contextmanager
def light_notebook(directory: Path, venv: LightVenv, server: ServerProcess) -> Iterator[Kernel]:
    """A light-client kernel with ``%load_ext mymps_magic`` done, whose ``%mymps`` reaches
    ``server`` by default: `kernels.notebook` on the client as users install it."""
    kernel = Kernel(directory, env={"MYMPS_SERVER_PORT": str(server.port), "MYMPS_TOKEN": server.token},
                    spec=venv.spec)
    try:
        ok(kernel.execute("%load_ext mymps_magic"))
        yield kernel
    finally:
        kernel.close()
