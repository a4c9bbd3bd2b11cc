"""The light client stays light: `import mymps_magic` pulls in no ML framework (SPEC 2)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "diffusers", "IPython", "tokenizers", "accelerate")

PROBE = f"""
import json, sys, time
started = time.perf_counter()
import mymps_magic
from mymps_magic import Client
Client(port=5555, token="t").close()
seconds = time.perf_counter() - started
print(json.dumps({{"seconds": seconds, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def _probe() -> dict[str, object]:
    # A fresh interpreter: this test process has long imported torch through other tests.
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout))


def test_import_pulls_in_no_heavy_framework() -> None:
    assert _probe()["heavy"] == []


def test_import_and_a_client_take_well_under_a_second() -> None:
    # About 0.16 s where measured; the bound leaves room for a slow CI machine.
    seconds = _probe()["seconds"]
    assert isinstance(seconds, float) and seconds < 1.0, f"import mymps_magic took {seconds:.2f} s"
