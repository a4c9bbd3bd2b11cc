"""Token rate of generation through the server against ``model.generate`` in-process.

Same model, same device (this machine's CPU), same greedy settings and length; the server's
figure includes everything a client pays: HTTP or WebSocket, the job queue and detokenising.
Run: ``.venv/bin/python benchmarks/generation_rate.py [--tokens 256] [--runs 3]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import QUIET_ENV, ServerProcess, build_long_model

os.environ.update(QUIET_ENV)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mymps_magic import Client

    with tempfile.TemporaryDirectory() as tmp:
        path = build_long_model(Path(tmp) / "model", hidden=256, layers=4)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = tokenizer("Once upon a time", return_tensors="pt").input_ids

        def in_process() -> float:
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
            return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)

        with ServerProcess(Path(tmp) / "home") as server, Client(port=server.port, token=server.token) as c:
            c.load_model(str(path), progress=False)
            opts = dict(max_new_tokens=args.tokens, temperature=0)

            def rest() -> float:
                start = time.perf_counter()
                n = c.generate(str(path), "Once upon a time", **opts)["tokens_generated"]
                return n / (time.perf_counter() - start)

            def streamed() -> float:
                start = time.perf_counter()
                with c.stream_generate(str(path), "Once upon a time", **opts) as stream:
                    for _ in stream:
                        pass
                return stream.stats["tokens_generated"] / (time.perf_counter() - start)

            rates = {}
            for name, fn in [("in-process model.generate", in_process), ("server POST /generate", rest),
                             ("server /ws/generate stream", streamed)]:
                fn()  # warm-up
                rates[name] = statistics.median(fn() for _ in range(args.runs))
    base = rates["in-process model.generate"]
    print(f"greedy, {args.tokens} tokens, median of {args.runs} runs, CPU:")
    for name, rate in rates.items():
        print(f"  {name:30s} {rate:8.1f} tokens/s  ({100 * rate / base:5.1f}% of in-process)")


if __name__ == "__main__":
    main()
