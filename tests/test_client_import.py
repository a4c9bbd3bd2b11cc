"""The light client stays light: `import mymps_magic` pulls in no ML framework (SPEC 2)."""

from __future__ import annotations

import json
import subprocess
import sys

from kit import ServerProcess

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


WITHOUT_SPEEDUPS = """
import sys
sys.modules["websockets.speedups"] = None  # as where websockets was installed without its C extension
from mymps_magic import Client
with Client(port=int(sys.argv[1]), token=sys.argv[2]) as c:
    c.push(text="x" * 70_000)
    print(c.run_cell("len(text)"))
"""


def test_the_client_works_where_websockets_has_no_c_extension(server: ServerProcess) -> None:
    out = subprocess.run([sys.executable, "-c", WITHOUT_SPEEDUPS, str(server.port), server.token],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "70000"
