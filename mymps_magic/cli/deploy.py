"""`mymps deploy`: copy this project to the remote machine and install the server extra there.

Two commands do it, and ``--dry-run`` prints exactly those: a copy (``rsync -a --delete`` over
ssh where rsync is installed here, which sends only what changed; else a ``tar`` stream into
``ssh``), then one ssh that runs a short POSIX sh script on the remote machine. The script makes
the virtual environment ``REMOTE_DIR/.venv`` if it is missing and installs the project into it,
editable, with the ``server`` extra. The install is skipped when a stamp in the venv holds the hash
of ``pyproject.toml`` and the install options, as ``scripts/dev.sh`` does here: the copy is
editable, so new code needs no pip, and an unchanged re-deploy takes a second or two.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mymps_magic.cli.ssh import SSH, remote_path
from mymps_magic.errors import CommandError

DEFAULT_REMOTE_DIR = "~/mymps"
DEFAULT_PYTHON = "python3"
VENV = ".venv"
STAMP = f"{VENV}/.mymps-installed"

# Never copied: version control, environments, caches and build output. The remote's .venv is
# also kept from rsync's --delete by being excluded. rsync also honours each .gitignore.
EXCLUDES = (".git/", ".venv/", "venv/", "__pycache__/", "*.pyc", "*.egg-info/", "build/", "dist/",
            ".pytest_cache/", ".mypy_cache/", ".ruff_cache/", ".ipynb_checkpoints/")

# The remote directory is mirrored with --delete and used in remote shell commands, so it is
# kept to plain path characters, and the home directory itself or / are refused.
_SAFE_DIR = re.compile(r"[A-Za-z0-9._+/-]+")


@dataclass(frozen=True)
class DeployPlan:
    """Everything a deploy does, resolved before anything runs, so ``--dry-run`` shows the truth.

    Attributes:
        ssh: the remote machine.
        source: the project directory here (it holds ``pyproject.toml``).
        remote_dir: where the project goes there (``~/x``, ``x`` below the home, or absolute).
        python: the remote interpreter that makes the venv.
        system_site_packages: whether the venv sees that interpreter's packages.
        pip_args: more ``pip install`` options.
        use_rsync: copy with rsync (installed here) rather than tar.
    """

    ssh: SSH
    source: Path
    remote_dir: str
    python: str
    system_site_packages: bool
    pip_args: tuple[str, ...]
    use_rsync: bool

    @classmethod
    def resolve(
        cls,
        destination: str | None,
        *,
        ssh_port: int | None = None,
        ssh_options: Sequence[str] = (),
        remote_dir: str | None = None,
        python: str | None = None,
        system_site_packages: bool = False,
        pip_args: str = "",
        source: str | Path | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> DeployPlan:
        """Apply the flags over ``MYMPS_USER``, ``MYMPS_HOST`` and ``MYMPS_SSH_PORT``.

        Raises:
            CommandError: no host, a bad remote directory, or no project to copy.
            BadRequestError: ``MYMPS_SSH_PORT`` is not a port number.
        """
        return cls(
            ssh=SSH.resolve(destination, ssh_port, ssh_options, os.environ if environ is None else environ),
            source=_project(source),
            remote_dir=_checked_remote_dir(remote_dir or DEFAULT_REMOTE_DIR),
            python=python or DEFAULT_PYTHON,
            system_site_packages=system_site_packages,
            pip_args=tuple(shlex.split(pip_args)),
            use_rsync=shutil.which("rsync") is not None,
        )

    @property
    def target(self) -> str:
        """``user@host:dir``, for messages."""
        return f"{self.ssh.destination}:{self.remote_dir}"

    @property
    def stamp(self) -> str:
        """The hash that says the venv is installed from this ``pyproject.toml`` with these options."""
        digest = hashlib.sha256((self.source / "pyproject.toml").read_bytes())
        digest.update(repr((self.python, self.system_site_packages, self.pip_args)).encode())
        return digest.hexdigest()

    @property
    def _prepare(self) -> str:
        """The remote shell words that make the directory, refusing one that holds something else.

        A mirror deletes what the project lacks: a typo'd ``--remote-dir`` naming a full folder
        (the home, say) must stop the copy, not empty the folder.
        """
        directory = remote_path(self.remote_dir)
        refusal = ('"mymps deploy: --remote-dir holds other files and no pyproject.toml; '
                   'refusing to mirror the project into it. Pick an empty or new one."')
        return (f'mkdir -p {directory} && if [ -n "$(ls -A {directory})" ] && [ ! -f {directory}/pyproject.toml ]; '
                f"then echo {refusal} >&2; exit 1; fi")

    def copy_commands(self) -> list[list[str]]:
        """The copy: one rsync command, or a tar command whose output is piped into an ssh."""
        directory = remote_path(self.remote_dir)
        if self.use_rsync:
            # A destination below the home is given relative to it: rsync 3.2.4+ no longer lets
            # the remote shell expand a ~ in its arguments.
            relative = self.remote_dir[2:] if self.remote_dir.startswith("~/") else self.remote_dir
            return [[
                "rsync", "-a", "--delete", "--out-format=%i %n",
                "--filter=:- .gitignore", *(f"--exclude={pattern}" for pattern in EXCLUDES),
                "-e", shlex.join(["ssh", *self.ssh.args("-o", "RequestTTY=no")]),
                f"--rsync-path={self._prepare} && rsync",
                f"{self.source}/", f"{self.ssh.destination}:{relative}/",
            ]]
        tar = ["tar", "-C", str(self.source), "-cf", "-", *(f"--exclude={p.rstrip('/')}" for p in EXCLUDES), "."]
        unpack = f"{self._prepare} && tar -C {directory} -xf -"
        return [tar, self.ssh.command("-o", "RequestTTY=no", remote=unpack)]

    def install_script(self) -> str:
        """The POSIX sh script that the remote runs: make or reuse the venv, pip unless stamped."""
        venv_flags = " --system-site-packages" if self.system_site_packages else ""
        pip = shlex.join(["pip", "install", "--disable-pip-version-check", "-q", *self.pip_args, "-e", ".[server]"])
        stamp = self.stamp
        return "\n".join([
            "set -e",
            f"cd {remote_path(self.remote_dir)}",
            f"if [ ! -x {VENV}/bin/python ]; then",
            f"    echo {shlex.quote(f'mymps deploy: making {VENV} with {self.python}')}",
            f"    {shlex.quote(self.python)} -m venv{venv_flags} {VENV}",
            "fi",
            f'if [ "$(cat {STAMP} 2>/dev/null)" = {stamp} ]; then',
            "    echo 'mymps deploy: pyproject.toml and options unchanged; pip skipped'",
            "else",
            "    echo 'mymps deploy: installing the server extra'",
            f"    {VENV}/bin/python -m {pip}",
            # The server's own start-up imports (torch, transformers, fastapi) prove the install.
            f"    {VENV}/bin/python -m kernel_server --help > /dev/null",
            f"    echo {stamp} > {STAMP}",
            "fi",
        ]) + "\n"

    def install_command(self) -> list[str]:
        """The ssh that runs `install_script`, given on its stdin."""
        return self.ssh.command("-o", "RequestTTY=no", remote="sh -s")

    def start_hint(self) -> str:
        """How to start the deployed server, and then the tunnel."""
        start = f"{self.remote_dir}/scripts/start-server.sh"
        return (f"start the server there with `{start}` (options: `{start} --help`), "
                f"then here: `mymps tunnel {self.ssh.destination}`.")


def run(plan: DeployPlan, *, dry_run: bool = False) -> int:
    """Copy and install as planned, or only print the commands.

    Returns:
        0 on success, 1 when a step failed (its own output is above the line that says so).
    """
    if dry_run:
        print(describe(plan))
        return 0
    began = time.monotonic()
    say(f"copying {plan.source} to {plan.target} ({'rsync' if plan.use_rsync else 'tar over ssh'})")
    copied = _copy(plan)
    if copied is None:
        return 1
    say(copied)
    done = subprocess.run(plan.install_command(), input=plan.install_script().encode())
    if done.returncode == 255:
        print(f"mymps deploy: cannot ssh to {plan.ssh.destination}; check the host, user, port (-p) and key (-i).",
              file=sys.stderr)
        return 1
    if done.returncode != 0:
        print(f"mymps deploy: the install on {plan.ssh.destination} failed (status {done.returncode}; "
              "its output is above). Fix it and run `mymps deploy` again.", file=sys.stderr)
        return 1
    say(f"deployed in {time.monotonic() - began:.1f} s; {plan.start_hint()}")
    return 0


def describe(plan: DeployPlan) -> str:
    """The commands a deploy runs, as one shell snippet that could be pasted and run as is."""
    commands = plan.copy_commands()
    copy = " | ".join(shlex.join(command) for command in commands)
    install = f"{shlex.join(plan.install_command())} <<'MYMPS'\n{plan.install_script()}MYMPS"
    return f"# mymps deploy {plan.target} (dry run: nothing was done)\n{copy}\n{install}"


def say(message: str) -> None:
    print(f"mymps deploy: {message}", flush=True)


def _copy(plan: DeployPlan) -> str | None:
    """Run the copy; the one line that says what it sent, or None when it failed."""
    commands = plan.copy_commands()
    if plan.use_rsync:
        done = subprocess.run(commands[0], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            print(f"mymps deploy: rsync to {plan.target} failed (status {done.returncode}; see above).",
                  file=sys.stderr)
            return None
        # --out-format=%i: "<f..." for a file sent to the remote, "*deleting" for one removed there.
        lines = done.stdout.decode(errors="replace").splitlines()
        sent = sum(line.startswith("<f") for line in lines)
        deleted = sum(line.startswith("*deleting") for line in lines)
        if not sent and not deleted:
            return "nothing changed, nothing sent"
        return f"{sent} changed file{'' if sent == 1 else 's'} sent, {deleted} deleted there"
    tar = subprocess.Popen(commands[0], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert tar.stdout is not None
    done = subprocess.run(commands[1], stdin=tar.stdout)
    tar.stdout.close()
    if tar.wait() != 0 or done.returncode != 0:
        print(f"mymps deploy: the tar copy to {plan.target} failed (see above).", file=sys.stderr)
        return None
    return "project sent as a tar stream (rsync is not installed here)"


def _project(source: str | Path | None) -> Path:
    """The project directory: ``--source``, else the checkout this mymps runs from."""
    # Without --source: mymps_magic/cli/deploy.py -> the checkout it runs from.
    path = Path(source).expanduser().resolve() if source is not None else Path(__file__).resolve().parents[2]
    if not (path / "pyproject.toml").is_file() or not (path / "kernel_server").is_dir():
        hint = (f"{path} holds no mymps project" if source is not None
                else "this mymps is installed, not run from a checkout")
        raise CommandError(f"nothing to deploy: {hint}; give --source DIR, a mymps checkout.")
    return path


def _checked_remote_dir(remote_dir: str) -> str:
    below_home = remote_dir[2:] if remote_dir.startswith("~/") else remote_dir
    parts = [part for part in below_home.split("/") if part]
    if not _SAFE_DIR.fullmatch(below_home) or not parts or ".." in parts or parts == ["."]:
        raise CommandError(f"--remote-dir {remote_dir!r}: give a directory below the home (~/mymps) or an absolute "
                           "path, of letters, digits and ._+-/ only; it becomes a mirror of the project.")
    return remote_dir
