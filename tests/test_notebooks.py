"""The example notebooks (``notebooks/``), executed end to end in a real kernel.

Each notebook runs top to bottom with nbclient, as ``jupyter nbconvert --execute`` would run it,
against the session's real server and the tiny local models. The models' paths are given through
``MYMPS_TEXT_MODEL`` / ``MYMPS_DIFFUSION_MODEL``, as a user would name a hub id, and the server
through ``MYMPS_SERVER_HOST`` / ``MYMPS_SERVER_PORT`` / ``MYMPS_TOKEN``. The kernel inherits this
process's environment. Each test checks what the cells showed (text, images, figures), not only
that they ran.

Each notebook loads its own copy of a tiny model, so it can unload the model at the end without
touching the models other tests use on the shared server.
"""

from __future__ import annotations

import ast
import base64
import importlib.metadata
import io
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import nbformat
import numpy as np
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from PIL import Image

from kit import REPO_ROOT, ServerProcess, TinyModels

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = ["quickstart", "remote_training", "diffusion", "arrays_and_functions"]
CELL_TIMEOUT_S = 120


class Executed:
    """An executed notebook, read the way a person reads it: by cell and by output kind."""

    def __init__(self, nb: nbformat.NotebookNode) -> None:
        self.nb = nb
        self.cells = {cell["id"]: cell for cell in nb.cells}

    def outputs(self, cell_id: str, *kinds: str) -> list[dict[str, Any]]:
        return [o for o in self.cells[cell_id].get("outputs", []) if not kinds or o["output_type"] in kinds]

    def stream(self, cell_id: str, name: str = "stdout") -> str:
        return "".join(o["text"] for o in self.outputs(cell_id, "stream") if o["name"] == name)

    def result(self, cell_id: str) -> str:
        """The cell's ``execute_result`` as text (``Out[n]``)."""
        results = self.outputs(cell_id, "execute_result")
        assert results, f"cell {cell_id!r} showed no value; outputs: {self.outputs(cell_id)}"
        return str(results[-1]["data"]["text/plain"])

    def pngs(self, cell_id: str) -> list[Image.Image]:
        """The PNG images the cell displayed, decoded."""
        images: list[Image.Image] = []
        for output in self.outputs(cell_id, "display_data", "execute_result"):
            if "image/png" in output["data"]:
                images.append(Image.open(io.BytesIO(base64.b64decode(output["data"]["image/png"]))))
        return images


RunNotebook = Callable[..., Executed]


@pytest.fixture
def run_notebook(server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunNotebook]:
    """Execute ``notebooks/NAME.ipynb`` in a fresh ``python3`` kernel; keyword arguments are
    extra environment variables for the kernel (``MYMPS_TEXT_MODEL=...``)."""
    sockets: list[str] = []

    def run(name: str, **env: str) -> Executed:
        # The kernel inherits os.environ: the developer's own MYMPS_* settings must not leak in.
        for key in [k for k in os.environ if k.startswith("MYMPS_")]:
            monkeypatch.delenv(key)
        # The kernel sets matplotlib's inline backend itself, unless MPLBACKEND says otherwise.
        monkeypatch.delenv("MPLBACKEND", raising=False)
        dirs = {kind: tmp_path / "jupyter" / kind for kind in ("runtime", "data", "config", "ipython", "mpl")}
        for path in dirs.values():
            path.mkdir(parents=True, exist_ok=True)
        settings = {
            "MYMPS_SERVER_HOST": server.host, "MYMPS_SERVER_PORT": str(server.port), "MYMPS_TOKEN": server.token,
            "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]), "JUPYTER_DATA_DIR": str(dirs["data"]),
            "JUPYTER_CONFIG_DIR": str(dirs["config"]), "IPYTHONDIR": str(dirs["ipython"]),
            "MPLCONFIGDIR": str(dirs["mpl"]),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            # As in an activated venv: `!mymps ...` in a cell finds this venv's command.
            "PATH": os.pathsep.join(filter(None, [str(Path(sys.executable).parent), os.environ.get("PATH")])),
            **env,
        }
        for key, value in settings.items():
            monkeypatch.setenv(key, value)

        nb = nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
        workdir = tmp_path / "cwd"
        workdir.mkdir(exist_ok=True)
        # IPC socket paths must stay under ~100 characters: a pytest tmp_path is too deep for them.
        sockets.append(tempfile.mkdtemp(prefix="mymps-nb", dir="/tmp"))
        km = KernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(sockets[-1], "k"))
        km.kernel_spec.argv[0] = sys.executable  # this venv's kernel, whatever the PATH says
        NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                       resources={"metadata": {"path": str(workdir)}}).execute()
        return Executed(nb)

    yield run
    for path in sockets:
        shutil.rmtree(path, ignore_errors=True)


def own_copy(source: Path, tmp_path: Path, name: str) -> str:
    """A copy of a tiny model under a name no other test loads."""
    return str(shutil.copytree(source, tmp_path / name))


def loaded_models(server: ServerProcess) -> list[str]:
    from mymps_magic import Client

    with Client(server.host, server.port, token=server.token) as client:
        return [m["name"] for m in client.models()]


def test_notebooks_are_valid_and_committed_without_outputs() -> None:
    found = sorted(path.stem for path in NOTEBOOKS_DIR.glob("*.ipynb"))
    assert found == sorted(NOTEBOOKS)
    for name in NOTEBOOKS:
        path = NOTEBOOKS_DIR / f"{name}.ipynb"
        json.loads(path.read_text())
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.nbformat == 4
        assert nb.metadata["kernelspec"]["name"] == "python3"
        assert nb.cells[0].cell_type == "markdown", f"{name} starts by saying what it is about"
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name}: cell {cell.id} has outputs"
        assert sum(c.cell_type == "markdown" for c in nb.cells) >= 4, f"{name} explains its steps"


def test_quickstart_opens_the_tunnel_with_mymps_tunnel() -> None:
    """A plain ``ssh -N -L`` forward costs about 40 ms a call and leaves the token to copy by hand;
    `mymps tunnel` fetches the token and keeps the forward up."""
    nb = nbformat.read(NOTEBOOKS_DIR / "quickstart.ipynb", as_version=4)
    text = "\n".join(cell.source for cell in nb.cells)
    assert "mymps tunnel you@mac" in text
    for manual in ("ssh -N -L 5555", "scp you@mac"):
        assert manual not in text, f"the quickstart still tells the user to run {manual!r}"


def test_quickstart(run_notebook: RunNotebook, server: ServerProcess, tiny_models: TinyModels, tmp_path: Path) -> None:
    model = own_copy(tiny_models.text_gpt2, tmp_path, "quickstart-text")
    nb = run_notebook("quickstart", MYMPS_TEXT_MODEL=model)

    assert ast.literal_eval(nb.result("settings")) == model
    assert nb.stream("tunnel").startswith(f"mymps tunnel: up at 127.0.0.1:{server.port}: mymps "), nb.stream("tunnel")
    assert nb.stream("connect").startswith(f"Connected to {server.host}:{server.port}: mymps ")
    panel = nb.outputs("status", "display_data")  # the panel; its text form for front ends without widgets
    assert panel and "application/vnd.jupyter.widget-view+json" in panel[-1]["data"], nb.outputs("status")
    status = str(panel[-1]["data"]["text/plain"])
    assert f"Server  {server.host}:{server.port}" in status and "device  cpu" in status, status
    assert nb.stream("load").startswith(f"Loaded {model} on cpu")

    generated = nb.stream("generate")
    tokens = re.search(r"\[(\d+) tokens, [\d.]+ tokens/s, stopped by (\w+)\]", generated)
    assert tokens and int(tokens[1]) >= 1, generated
    assert not nb.stream("generate", "stderr"), "a normal generation shows no error box"
    assert generated[:tokens.start()].strip(), "the streamed tokens are printed in the cell, before the stats"

    # The stream loop prints the pieces, a newline, then the stats dict.
    streamed, stats_line = nb.stream("stream").rstrip("\n").rsplit("\n", 1)
    stats = ast.literal_eval(stats_line)
    assert stats["tokens_generated"] >= 1 and stats["stop_reason"] in ("max_tokens", "eos"), stats
    assert streamed.strip()
    assert ast.literal_eval(nb.result("generate-call")) == streamed, "same seed, same text: stream and generate agree"
    assert nb.stream("generate-call").startswith(f"{stats['tokens_generated']} tokens, ")

    assert nb.stream("remote-cell") == "running on cpu\n"
    assert 900 < float(nb.result("remote-cell")) < 1150, "mean squared norm of 1024 standard normals"
    assert nb.stream("remote-state") == "Tensor (1024, 1024) cpu\n", "the remote variable outlives its cell"

    model_repr = nb.result("model-value")
    assert model_repr.startswith("GPT2LMHeadModel(\n  (transformer): GPT2Model("), "the model's repr, not the model"
    generated_hf = ast.literal_eval(nb.result("hf-generate"))
    assert generated_hf.startswith("The meaning of life is") and len(generated_hf) > len("The meaning of life is")

    machine, names, *pip = nb.stream("ipython").splitlines()
    uname = os.uname()
    assert machine == f"{uname.sysname} {uname.machine}" or machine.startswith("GPU 0: "), machine
    assert {"TEXT_MODEL", "gram", "x", "tokenizer", "model"} <= set(names.split()), names
    assert not {"models", "tokenizers", "DEVICE"} & set(names.split()), f"%who lists predefined names: {names}"
    assert "Name: torch" in pip and f"Version: {importlib.metadata.version('torch')}" in pip, pip

    assert nb.stream("remote-on") == f"Every following cell will run remotely on {server.host}:{server.port}, until %mymps off.\n"
    [marker] = nb.outputs("remote-mode", "display_data")
    assert marker["data"]["text/plain"] == f"[mymps] ran remotely on {server.host}:{server.port}"
    assert nb.result("remote-mode") == "6.0"
    assert nb.stream("remote-off") == "Cells run locally again.\n"
    assert nb.result("local-again") == "False", "y was defined on the server, not in the notebook"

    assert nb.stream("cleanup").startswith(f"Unloaded {model} (")
    assert model not in loaded_models(server)


def test_remote_training(run_notebook: RunNotebook) -> None:
    nb = run_notebook("remote_training")

    assert re.fullmatch(r"trained \d+ parameters on cpu\n", nb.stream("train")), nb.stream("train")
    bars = [o for o in nb.outputs("train", "display_data") if "application/vnd.jupyter.widget-view+json" in o["data"]]
    assert bars or "training" in nb.stream("train", "stderr"), "the remote progress bar shows in the cell"

    summary = re.search(r"(\d+) losses: first ([\d.]+), last ([\d.]+)", nb.stream("curve"))
    assert summary, nb.stream("curve")
    count, first, last = int(summary[1]), float(summary[2]), float(summary[3])
    assert count == 200
    assert last < first / 10, "the loss pulled back from the server fell during training"
    assert "model is local: False" in nb.stream("curve"), "the model stays remote"
    assert len(nb.pngs("curve")) == 1, "the loss curve is plotted locally"

    handle = re.compile(r"<remote cell \d+: (running|done)>")
    assert handle.fullmatch(nb.result("noblock")), "--noblock returns a handle at once"
    assert handle.fullmatch(nb.result("handle")), nb.result("handle")
    steps = re.findall(r"step (\d+): loss ([\d.]+)\n", nb.stream("wait"))
    assert [int(step) for step, _ in steps] == [300, 400, 500], nb.stream("wait")
    assert float(nb.result("wait")) == pytest.approx(float(steps[-1][1]), abs=1e-4), "the waited cell's value"
    assert float(nb.result("wait")) < first / 10

    error = re.search(r"max error against sin\(x\): ([\d.e-]+)", nb.stream("plot-prediction"))
    assert error and float(error[1]) < 0.3, nb.stream("plot-prediction")
    assert len(nb.pngs("plot-prediction")) == 1
    assert "empty again" in nb.stream("cleanup")


def test_diffusion(run_notebook: RunNotebook, server: ServerProcess, tiny_models: TinyModels, tmp_path: Path) -> None:
    model = own_copy(tiny_models.diffusion, tmp_path, "diffusion-pipeline")
    nb = run_notebook("diffusion", MYMPS_DIFFUSION_MODEL=model, MYMPS_DIFFUSION_STEPS="4")

    assert ast.literal_eval(nb.result("settings")) == (model, 4)
    assert nb.stream("load").startswith(f"Loaded {model} on cpu")
    [magic_image] = nb.pngs("image-magic")
    assert magic_image.size == (8, 8), "the tiny pipeline's own image, shown by %mymps image"

    assert nb.stream("image-client") == "(8, 8) RGB\n(8, 8) RGB\n"
    shown = nb.pngs("image-client")
    assert [im.size for im in shown] == [(256, 256), (256, 256)]
    assert shown[0].tobytes() != shown[1].tobytes(), "two images of one request differ"
    assert nb.stream("seed") == "same seed, same image: True\n"

    remote = nb.stream("remote-pipeline")
    assert remote.startswith("DDPMPipeline on cpu\nunet: "), remote
    assert nb.stream("cleanup").startswith(f"Unloaded {model} (")
    assert model not in loaded_models(server)


def test_arrays_and_functions(run_notebook: RunNotebook, server: ServerProcess) -> None:
    nb = run_notebook("arrays_and_functions")

    assert nb.stream("connect") == f"Client('{server.host}:{server.port}') cpu\n"
    assert nb.stream("push-pull") == "round trip equal: True float32 (1000, 256) 3.0\n"
    assert nb.stream("run-cell") == "computed on cpu\nscaled equal: True\n"
    assert nb.stream("remote-value") == "RemoteValue: Linear(in_features=256, out_features=4, bias=True)\n", \
        "a value that is not plain data stays on the server and comes back as its repr"

    # The same array as the notebook's, so the remote SVD can be checked here.
    a = np.random.default_rng(0).standard_normal((1000, 256)).astype(np.float32)
    largest = float(np.linalg.svd(a[:64, :64], compute_uv=False)[0])
    run = nb.stream("run")
    value = re.search(r"largest singular value: ([\d.]+)", run)
    assert value and float(value[1]) == pytest.approx(largest, abs=1e-3), run
    assert "sum: 45.0\n" in run

    assert nb.stream("remote") == "means match: True\nstds match: True\n"

    submit = nb.stream("submit")
    # submit returns at once: the last call, behind 0.8 s of the others' remote sleeps, is not done yet
    assert re.search(r"submitted 5 calls in [\d.]+ s\nthe last one still running: True\n", submit), submit
    assert "results: [0, 1, 4, 9, 16]\n" in submit

    assert nb.stream("errors").startswith("caught ZeroDivisionError: division by zero"), nb.stream("errors")
