"""``python -m mymps_magic.dashboard``: the same as ``mymps dashboard``."""

from __future__ import annotations

import sys

from mymps_magic.dashboard import main

sys.exit(main())
