"""Shared by the benchmark scripts: the real server (the kit's `ServerProcess`, over the launcher `mymps demo` uses) and a model that can talk long."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from kit import QUIET_ENV, ServerProcess  # noqa: E402

__all__ = ["QUIET_ENV", "ServerProcess", "build_long_model", "summary"]


def build_long_model(directory: Path, *, hidden: int = 512, layers: int = 8) -> Path:
    """The kit's tiny Llama, widened and given an 8k context and no end token.

    Without an end token every generation runs to ``max_new_tokens``, so a benchmark can ask for
    a generation of a known length.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kernel_server.tinymodels import build_tiny_text_model

    path = build_tiny_text_model(directory, arch="llama")
    config = LlamaConfig.from_pretrained(path)
    config.update({"hidden_size": hidden, "intermediate_size": hidden * 2, "num_hidden_layers": layers,
                   "max_position_embeddings": 8192, "eos_token_id": None})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    return path


def summary(seconds: list[float]) -> str:
    ms = sorted(s * 1e3 for s in seconds)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"median {statistics.median(ms):.2f} ms, p99 {p99:.2f} ms, max {ms[-1]:.2f} ms (n={len(ms)})"
