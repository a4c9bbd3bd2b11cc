"""The notebook as a user on the Linux side has it: a kernel whose venv has only the light client.

The kernel runs in the venv `lightclient` builds (``pip install .`` plus ipykernel: no torch, no
transformers), started through its own kernelspec, against the session's real server. What the
README promises of the client install is checked there, where the project's own venv, which has
every server dependency, would hide a missing one.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from collections.abc import Iterator

import pytest

from notebook_kernel import Kernel, ok
from kit import ServerProcess, TinyModels
from lightclient import LightVenv, light_notebook

pytestmark = pytest.mark.slow

WIDGET = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(scope="module")
def light_nb(light_client: LightVenv, server: ServerProcess,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kernel]:
    """A started kernel of the light venv, with nothing loaded and no server settings: the test
    connects as a user does."""
    kernel = Kernel(tmp_path_factory.mktemp("light-kernel"), spec=light_client.spec)
    yield kernel
    kernel.close()


def test_the_kernel_runs_in_the_light_venv_without_torch(light_nb: Kernel, light_client: LightVenv) -> None:
    where = ok(light_nb.execute("import sys; print(sys.executable)"))
    assert where.stdout == f"{light_client.python}\n"
    for heavy in ("torch", "transformers"):
        missing = light_nb.execute(f"import {heavy}")
        assert missing.status == "error" and missing.error is not None
        assert missing.error["ename"] == "ModuleNotFoundError", missing.error


def test_remote_cells_from_the_light_client(light_nb: Kernel, server: ServerProcess) -> None:
    ok(light_nb.execute("%load_ext mymps_magic"))
    connected = ok(light_nb.execute(f"%mymps connect {server.host}:{server.port} --token {server.token}"))
    assert connected.stdout.startswith(f"Connected to {server.host}:{server.port}: mymps "), connected.stdout

    number = ok(light_nb.execute("%%mymps\nlight_numbers = [n * n for n in range(5)]\nsum(light_numbers)"))
    assert number.result is not None and number.result["text/plain"] == "30", number.result
    listed = ok(light_nb.execute("%%mymps\nlight_numbers"))
    assert listed.result is not None and listed.result["text/plain"] == "[0, 1, 4, 9, 16]", listed.result

    printed = ok(light_nb.execute("%%mymps\nimport torch\nprint('remote torch', torch.__version__ is not None)"))
    assert printed.stdout == "remote torch True\n" and printed.result is None


def test_loading_shows_a_widget_progress_bar(light_client: LightVenv, server: ServerProcess,
                                             tiny_models: TinyModels, tmp_path: Path) -> None:
    """ipywidgets comes with the client: tqdm draws a widget, not a text bar and a TqdmWarning."""
    name = "light-client-llama"
    with light_notebook(tmp_path, light_client, server) as light_nb:
        load = ok(light_nb.execute(f"%mymps load {name} --path {shlex.quote(str(tiny_models.text_llama))}"))
        light_nb.execute(f"%mymps unload {name}")
    assert "IProgress not found" not in load.stderr, load.stderr
    bars = [m for m in load.of_type("display_data") if WIDGET in m["content"]["data"]]
    assert bars, f"no widget progress bar; stderr: {load.stderr!r}"
    assert any(m["content"]["data"].get("text/plain", "").startswith(f"Loading {name}") for m in bars), bars
    assert re.match(rf"Loaded {name} on cpu", load.stdout), load.stdout
