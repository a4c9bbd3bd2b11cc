"""Token rate of chat and the OpenAI-compatible endpoints against ``POST /generate``, same run.

One server, one model (the kit's Llama widened, no end token, so every generation runs to its
length), greedy, the same length. ``/generate`` gets the very prompt the chat template writes
for the conversation, so every row generates the same tokens from the same prompt; what differs
is only the endpoint: its body, the template, the answer's shape, the streaming. Rates are tokens
over the client's wall time per call, after one warm-up call each; the rows take turns, run by
run, so a busy moment of the machine does not fall on one row only. Printed: the median and the
best run of each row, as a share of ``POST /generate``'s (on a shared 2-core machine the best run
is the steadier figure: what the path costs when nothing else runs).
Run: ``.venv/bin/python benchmarks/chat_rate.py [--tokens 256] [--runs 5]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import QUIET_ENV, ServerProcess, build_long_model
from _machine import machine_line

os.environ.update(QUIET_ENV)

CONVERSATION = [{"role": "system", "content": "You are a storyteller."},
                {"role": "user", "content": "Tell me about the little house by the river."}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(machine_line())

    import openai
    from transformers import AutoTokenizer

    from mymps_magic import Client

    with tempfile.TemporaryDirectory() as tmp:
        path = build_long_model(Path(tmp) / "model", hidden=256, layers=4)
        name = str(path)
        prompt = AutoTokenizer.from_pretrained(path).apply_chat_template(CONVERSATION, add_generation_prompt=True,
                                                                         tokenize=False)
        with ServerProcess(Path(tmp) / "home") as server, Client(port=server.port, token=server.token) as c, \
                openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0) as ai:
            c.load_model(name, progress=False)
            n = args.tokens

            def generate() -> int:
                return int(c.generate(name, prompt, max_new_tokens=n, temperature=0)["tokens_generated"])

            def ws_generate() -> int:
                with c.stream_generate(name, prompt, max_new_tokens=n, temperature=0) as stream:
                    for _ in stream:
                        pass
                return int((stream.stats or {})["tokens_generated"])

            def chat() -> int:
                return int(c.chat(name, CONVERSATION, max_new_tokens=n, temperature=0)["tokens_generated"])

            def ws_chat() -> int:
                with c.chat(name, CONVERSATION, stream=True, max_new_tokens=n, temperature=0) as stream:
                    for _ in stream:
                        pass
                return int((stream.stats or {})["tokens_generated"])

            def openai_chat() -> int:
                done = ai.chat.completions.create(model=name, messages=CONVERSATION,  # type: ignore[arg-type]
                                                  max_tokens=n, temperature=0)
                return done.usage.completion_tokens if done.usage else 0

            def openai_chat_stream() -> int:
                chunks = ai.chat.completions.create(model=name, messages=CONVERSATION,  # type: ignore[arg-type]
                                                    max_tokens=n, temperature=0, stream=True,
                                                    stream_options={"include_usage": True})
                usage = [chunk.usage for chunk in chunks if chunk.usage]
                return usage[-1].completion_tokens

            def openai_completion() -> int:
                done = ai.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0)
                return done.usage.completion_tokens if done.usage else 0

            rows: dict[str, Callable[[], int]] = {
                "POST /generate": generate, "/ws/generate stream": ws_generate, "POST /chat": chat,
                "/ws/chat stream": ws_chat,
                "/v1/chat/completions": openai_chat, "/v1/chat/completions stream": openai_chat_stream,
                "/v1/completions": openai_completion,
            }
            rates: dict[str, list[float]] = {row: [] for row in rows}
            for fn in rows.values():
                fn()  # warm-up
            for _ in range(args.runs):
                for row, fn in rows.items():
                    start = time.perf_counter()
                    tokens = fn()
                    elapsed = time.perf_counter() - start
                    assert tokens == n, f"{row}: {tokens} tokens, not {n}"
                    rates[row].append(tokens / elapsed)
    base, best_base = statistics.median(rates["POST /generate"]), max(rates["POST /generate"])
    print(f"greedy, {args.tokens} tokens from the same templated prompt, {args.runs} runs, CPU, tokens/s:")
    print(f"  {'':30s} {'median':>8s} {'':9s} {'best':>8s}")
    for row, values in rates.items():
        rate, best = statistics.median(values), max(values)
        print(f"  {row:30s} {rate:8.1f} ({100 * rate / base:5.1f}%) {best:8.1f} ({100 * best / best_base:5.1f}%)  "
              f"worst {min(values):.0f}")


if __name__ == "__main__":
    main()
