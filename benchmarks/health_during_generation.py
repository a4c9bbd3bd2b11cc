"""``/health`` latency while a 30-second generation runs, against the same server idle.

The original mymps ran generation on the event loop, so ``/health`` waited up to 1.7 s behind
it. Here the generation asks for more tokens than fit in the window, ``/health`` is called
``--calls`` times spread over ``--seconds``, and then the generation is cancelled.
Run: ``.venv/bin/python benchmarks/health_during_generation.py [--seconds 30] [--calls 100]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

from _common import QUIET_ENV, ServerProcess, build_long_model, summary

os.environ.update(QUIET_ENV)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the generation runs")
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()

    import httpx

    with tempfile.TemporaryDirectory() as tmp, ServerProcess(Path(tmp) / "home") as server:
        model = str(build_long_model(Path(tmp) / "model"))
        auth = {"Authorization": f"Bearer {server.token}"}
        with httpx.Client(base_url=server.url, headers=auth, timeout=None) as http:

            def health_latencies(pause: float) -> list[float]:
                out = []
                for _ in range(args.calls):
                    start = time.perf_counter()
                    http.get("/health").raise_for_status()
                    out.append(time.perf_counter() - start)
                    time.sleep(pause)
                return out

            http.post("/models/load", json={"name": model}).raise_for_status()
            idle = health_latencies(0.01)
            result: dict[str, object] = {}
            body = {"model": model, "prompt": "Once", "max_new_tokens": 8000, "temperature": 0.8}
            worker = threading.Thread(target=lambda: result.update(http.post("/generate", json=body).json()))
            worker.start()
            while not http.get("/jobs").json()["jobs"]:
                time.sleep(0.001)
            busy = health_latencies(args.seconds / args.calls)
            jobs = http.get("/jobs").json()["jobs"]
            if jobs:  # the window is over: cancel rather than wait for the end
                http.delete(f"/jobs/{jobs[0]['id']}")
            worker.join()
    print(f"generation: {result['tokens_generated']} tokens in {result['time_s']} s "
          f"({result['tokens_per_s']} tokens/s), stop_reason {result['stop_reason']}")
    print(f"/health idle:               {summary(idle)}")
    print(f"/health while it generates: {summary(busy)}")


if __name__ == "__main__":
    main()
