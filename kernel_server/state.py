"""What ``--restore`` brings back: the loaded models, kept in ``$MYMPS_HOME/state.json``.

The file is rewritten after every load and unload a client asks for, atomically (write then
rename), so a crash leaves the last complete list. The shutdown unloads nothing, so stopping the
server leaves the file as it was: the models loaded at the end are the ones restored.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

from mymps_magic.wire import LoadRequest

log = logging.getLogger("kernel_server.state")

VERSION = 1


class ModelState:
    """Reads and writes the list of loaded models' load requests."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, requests: list[LoadRequest]) -> None:
        """Replace the file (mode 0600: it names the user's models and paths)."""
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a leftover .tmp from an older version may be wider
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps({"version": VERSION, "models": [asdict(r) for r in requests]}, indent=1))
        os.replace(tmp, self.path)

    def read(self) -> list[LoadRequest]:
        """The requests to restore; a missing file is an empty list, a broken one a warning."""
        try:
            data = json.loads(self.path.read_text())
            return [LoadRequest(**entry) for entry in data["models"]]
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring %s: it is not a mymps state file (%s)", self.path, exc)
            return []
