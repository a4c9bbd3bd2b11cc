"""Shared fixtures: tiny local models and real server processes on loopback ports.

Tests run the real ``python -m kernel_server`` (SPEC 2, STYLE habit 10): nothing but the ``mps``
device is faked. See ``kit.py`` for the builders and `ServerProcess`.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import httpx
import pytest

from notebook_kernel import CellRun, Kernel, notebook, ok
from kit import QUIET_ENV, MakeServer, ServerProcess, TinyModels, auth, build_tiny_models

if TYPE_CHECKING:
    from dashboardprocess import DashboardProcess
    from lightclient import LightVenv
    from mymps_magic import Client

# Set at import, before any test imports huggingface_hub: it reads HF_HUB_OFFLINE once, when
# imported, so a fixture would be too late.
os.environ.update(QUIET_ENV)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """Every tiny model, built once per session into a temp dir (about 3 s, mostly imports)."""
    from diffusers.utils import logging as diffusers_logging

    # A loaded pipeline's own progress bar stays on; tests that run one disable it on the pipe.
    diffusers_logging.disable_progress_bar()
    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real server shared by the session, for tests that leave it as they found it.

    A test that changes the server for good (unloads a model others use, fills memory, needs
    other options) uses `make_server` instead.
    """
    with ServerProcess(tmp_path_factory.mktemp("server-home")) as process:
        yield process


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[MakeServer]:
    """A factory for a test's own servers, started and waited for; all are stopped afterwards.

    ``make_server(max_body="1KiB")`` starts ``--max-body 1KiB``; keyword arguments are options
    as `ServerProcess` takes them, plus ``home``, ``port``, ``env`` and ``token_file``.
    """
    started: list[ServerProcess] = []

    def make(
        *,
        home: Path | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        token_file: bool = False,
        **options: object,
    ) -> ServerProcess:
        process = ServerProcess(
            home if home is not None else tmp_path / f"server-home-{len(started)}",
            port=port,
            options=options,
            env=env,
            token_file=token_file,
        )
        started.append(process)
        return process.start()

    yield make
    for process in started:
        process.stop()


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    """An authenticated httpx client on the shared server (no proxy from the environment)."""
    with httpx.Client(base_url=server.url, headers=auth(server.token), timeout=60.0, trust_env=False) as client:
        yield client


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Client]:
    """A `mymps_magic.Client` talking to the shared `server` over real HTTP."""
    from mymps_magic import Client

    with Client(host="127.0.0.1", port=server.port, token=server.token) as connected:
        yield connected


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Kernel]:
    """A real IPython kernel (jupyter_client), stopped after the test."""
    started = Kernel(tmp_path / "kernel")
    yield started
    started.close()


@pytest.fixture
def own_kernel(tmp_path: Path) -> Iterator[Callable[..., Kernel]]:
    """A factory for a test's own kernels (extension loaded), for tests that replace the client
    or must break it from the start: ``own_kernel(setup, **env)``, where ``setup`` runs before
    ``%load_ext`` and ``env`` is the kernel's environment."""
    started: list[Kernel] = []

    def make(setup: str = "", **env: str) -> Kernel:
        kernel = Kernel(tmp_path / f"kernel-{len(started)}", env=env)
        started.append(kernel)
        ok(kernel.execute(setup + "\n%load_ext mymps_magic"))
        return kernel

    yield make
    for kernel in started:
        kernel.close()


# -- the module's notebook and the models it loads --------------------------------------------------


def _module_name(request: pytest.FixtureRequest) -> str:
    """``magics`` for ``test_magics``: names a module's kernel and models, so that modules sharing
    the session's server never share a loaded model."""
    return request.module.__name__.removeprefix("test_").replace("_", "-")


@pytest.fixture(scope="module")
def nb(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory,
       request: pytest.FixtureRequest) -> Iterator[Kernel]:
    """The module's notebook: a real kernel with the extension loaded, on the shared server."""
    with notebook(tmp_path_factory.mktemp(f"{_module_name(request)}-kernel"), server) as kernel:
        yield kernel


@pytest.fixture(scope="module")
def llama_load(nb: Kernel, tiny_models: TinyModels, request: pytest.FixtureRequest) -> Iterator[CellRun]:
    """The tiny Llama loaded into `nb` through ``%mymps load``, named as `llama` says; the load
    cell's run (its progress bar and its "Loaded" line). Unloaded when the module ends."""
    name = f"{_module_name(request)}-llama"
    run = ok(nb.execute(f"%mymps load {name} --path {shlex.quote(str(tiny_models.text_llama))}"))
    yield run
    nb.execute(f"%mymps unload {name}")


@pytest.fixture(scope="module")
def llama(llama_load: CellRun, request: pytest.FixtureRequest) -> str:
    """The name of the tiny Llama loaded in `nb` (``magics-llama`` in ``test_magics``)."""
    return f"{_module_name(request)}-llama"


@pytest.fixture(scope="module")
def diffusion(nb: Kernel, tiny_models: TinyModels, request: pytest.FixtureRequest) -> Iterator[str]:
    """The name of the tiny DDPM pipeline loaded in `nb`; unloaded when the module ends."""
    name = f"{_module_name(request)}-ddpm"
    ok(nb.execute(f"%mymps load {name} --path {shlex.quote(str(tiny_models.diffusion))} --kind diffusion"))
    yield name
    nb.execute(f"%mymps unload {name}")


@pytest.fixture(scope="session")
def light_client(request: pytest.FixtureRequest) -> LightVenv:
    """The light-client venv (``pip install .`` and ipykernel, no torch) and its kernelspec; built
    once into ``.venv-light/`` (about 30 s), which says so on the terminal while it builds."""
    from lightclient import light_venv

    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        return light_venv()


@pytest.fixture
def dashboard(make_server: MakeServer, tmp_path: Path) -> Iterator[tuple[ServerProcess, DashboardProcess]]:
    """A server of the test's own (its models may be unloaded) and `mymps dashboard` in front of it."""
    from dashboardprocess import DashboardProcess

    server = make_server()
    with DashboardProcess(server.port, server.token, tmp_path / "dashboard-home") as process:
        yield server, process
