"""`mymps deploy` through a real sshd onto this same machine: dry run, a real install, re-runs.

The "remote" is this machine reached through the test sshd, with a temporary ``--remote-dir``.
A real install of the server extra downloads and unpacks about 1.3 GB (torch alone is 750 MB)
and takes a minute and a half here, so the remote is given what a Mac with PyTorch already
installed has: its sessions find the server extra's dependencies on ``PYTHONPATH`` (links to this
venv's packages, minus mymps itself and pip), and ``--python`` is this venv's base interpreter.
pip then really resolves and installs ``.[server]`` into the new remote venv, finds every
dependency satisfied, and installs mymps itself; `python -m kernel_server --help` proves it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest

from kit import REPO_ROOT
from sshd import SSHServer, missing_tools

# The project's own files and pip's stay out of the shared packages: the remote venv must get
# mymps from the deploy, and run its own pip.
_NOT_SHARED = ("mymps", "__editable__", "_distutils_hack", "distutils-precedence", "pip", "setuptools",
               "pkg_resources", "__pycache__")
_COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", ".mypy_cache", ".pytest_cache", "__pycache__", "*.egg-info",
                                      "build", "dist")
BASE_PYTHON = str(Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}")


def shared_packages(directory: Path) -> Path:
    """A folder of links to this venv's installed packages, but for mymps's own and pip's."""
    directory.mkdir(parents=True)
    site = Path(next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix)))
    for entry in site.iterdir():
        if not entry.name.startswith(_NOT_SHARED) and not entry.name.endswith(".pth"):
            (directory / entry.name).symlink_to(entry)
    return directory


def mymps(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the `mymps` command as a user would, to the end, with none of the developer's MYMPS_*."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith("MYMPS_")}
    return subprocess.run([sys.executable, "-m", "mymps_magic.cli", *args], cwd=REPO_ROOT, env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


class Deployed(NamedTuple):
    remote: SSHServer
    source: Path
    remote_dir: Path
    first: subprocess.CompletedProcess[str]
    first_s: float

    def deploy(self, *more: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
        began = time.monotonic()
        done = mymps("deploy", self.remote.destination, *self.remote.mymps_options, "--source", str(self.source),
                     "--remote-dir", str(self.remote_dir), "--python", BASE_PYTHON, *more, env=env)
        return done, time.monotonic() - began


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """sshd for a "remote" whose sessions have the server extra's dependencies preinstalled."""
    reason = missing_tools()
    if reason is not None:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("deploy-remote")
    with SSHServer(root / "sshd", set_env={"PYTHONPATH": str(shared_packages(root / "packages"))}) as server:
        yield server


@pytest.fixture(scope="module")
def deployed(remote: SSHServer, tmp_path_factory: pytest.TempPathFactory) -> Deployed:
    """A copy of the project (so tests may change it), deployed once for real."""
    root = tmp_path_factory.mktemp("deploy")
    source = root / "project"
    shutil.copytree(REPO_ROOT, source, ignore=_COPY_IGNORE, symlinks=True)
    state = Deployed(remote, source, root / "remote" / "mymps", subprocess.CompletedProcess([], 0), 0.0)
    first, first_s = state.deploy()
    return state._replace(first=first, first_s=first_s)


def test_no_host_is_one_clear_line() -> None:
    done = mymps("deploy")
    assert done.returncode == 2
    assert done.stderr == "mymps deploy: no host given; pass user@host, or set MYMPS_HOST (and MYMPS_USER).\n"


def test_the_home_itself_is_refused_as_remote_dir() -> None:
    done = mymps("deploy", "somehost", "--remote-dir", "~", "--dry-run")
    assert done.returncode == 2
    assert done.stderr.startswith("mymps deploy: --remote-dir '~': ") and done.stderr.count("\n") == 1


@pytest.mark.slow
def test_dry_run_prints_the_commands_and_does_nothing(remote: SSHServer, tmp_path: Path) -> None:
    logins_before = remote.log_text().count("Accepted publickey")
    target = tmp_path / "remote" / "mymps"
    done = mymps("deploy", remote.destination, *remote.mymps_options, "--remote-dir", str(target),
                 "--python", BASE_PYTHON, "--system-site-packages", "--pip-args=--no-cache-dir", "--dry-run")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith(f"# mymps deploy {remote.destination}:{target} (dry run: nothing was done)\n")
    assert "rsync -a --delete" in out and f" {REPO_ROOT}/ {remote.destination}:{target}/" in out
    assert f"{BASE_PYTHON} -m venv --system-site-packages .venv" in out
    assert "-m pip install --disable-pip-version-check -q --no-cache-dir -e '.[server]'" in out
    assert not target.parent.exists()
    assert remote.log_text().count("Accepted publickey") == logins_before  # not even a connection


def test_the_default_remote_dir_is_below_the_home() -> None:
    done = mymps("deploy", "user@mac", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert " user@mac:mymps/" in done.stdout and 'cd "$HOME"/mymps' in done.stdout


@pytest.mark.slow
def test_deploy_installs_the_server_and_a_rerun_is_fast(deployed: Deployed) -> None:
    first = deployed.first
    assert first.returncode == 0, first.stdout + first.stderr
    assert "making .venv" in first.stdout and "installing the server extra" in first.stdout
    assert "start-server.sh" in first.stdout.splitlines()[-1]
    venv_python = deployed.remote_dir / ".venv" / "bin" / "python"
    # On the remote, as a user there would run it.
    help_run = subprocess.run(deployed.remote.ssh(f"{venv_python} -m kernel_server --help"), capture_output=True,
                              text=True, timeout=120)
    assert help_run.returncode == 0, help_run.stderr
    assert "usage: mymps serve" in help_run.stdout
    where = subprocess.run(deployed.remote.ssh(f"{venv_python} -c 'import kernel_server; print(kernel_server.__file__)'"),
                           capture_output=True, text=True, timeout=120)
    assert where.stdout.strip() == str(deployed.remote_dir / "kernel_server" / "__init__.py")
    wrapper = subprocess.run(deployed.remote.ssh(f"{deployed.remote_dir}/scripts/start-server.sh --help"),
                             capture_output=True, text=True, timeout=120)
    assert "usage: mymps serve" in wrapper.stdout, wrapper.stderr  # the hint's script finds the venv

    again, again_s = deployed.deploy()
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing changed, nothing sent" in again.stdout and "pip skipped" in again.stdout
    assert again_s < deployed.first_s / 2
    print(f"\nmymps deploy: first run {deployed.first_s:.1f} s, second run {again_s:.1f} s")


@pytest.mark.slow
def test_a_redeploy_mirrors_changes_and_keeps_the_venv(deployed: Deployed) -> None:
    (deployed.source / "added.txt").write_text("new\n")
    (deployed.source / "docs" / "HTTP_API.md").unlink()
    done, _ = deployed.deploy()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 changed file sent, 1 deleted there" in done.stdout and "pip skipped" in done.stdout
    assert (deployed.remote_dir / "added.txt").read_text() == "new\n"
    assert not (deployed.remote_dir / "docs" / "HTTP_API.md").exists()
    assert (deployed.remote_dir / ".venv" / "bin" / "python").exists()


@pytest.mark.slow
def test_without_rsync_the_copy_is_a_tar_stream(deployed: Deployed, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"  # a PATH with ssh and tar, and no rsync
    bin_dir.mkdir()
    for tool in ("ssh", "tar"):
        (bin_dir / tool).symlink_to(shutil.which(tool) or tool)
    (deployed.source / "by-tar.txt").write_text("tar\n")
    done, _ = deployed.deploy(env={"PATH": str(bin_dir)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tar stream" in done.stdout and "pip skipped" in done.stdout
    assert (deployed.remote_dir / "by-tar.txt").read_text() == "tar\n"


@pytest.mark.slow
def test_a_folder_holding_other_files_is_not_mirrored_into(remote: SSHServer, tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "precious.txt").write_text("keep me\n")
    done = mymps("deploy", remote.destination, *remote.mymps_options, "--remote-dir", str(full))
    assert done.returncode == 1
    assert "refusing to mirror the project into it" in done.stderr
    assert sorted(path.name for path in full.iterdir()) == ["precious.txt"]
