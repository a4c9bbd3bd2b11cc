"""``python -m mymps_magic.cli``: the `mymps` command where no ``mymps`` script is on PATH."""

from __future__ import annotations

import sys

from mymps_magic.cli import main

sys.exit(main())
