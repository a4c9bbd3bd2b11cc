"""How generation decodes per device (kernel_server/decoding.py), and that ``model.generate``
through the server leaves the sessions' random state alone.

The compiled path runs on CUDA only (``benchmarks/generation_rate.py --device cuda`` measures it);
here the static cache it uses is checked on the CPU, uncompiled, against plain ``generate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kernel_server.decoding import FIRST_BUCKET, Decoding, bucket, prepare
from mymps_magic import Client


def test_lengths_share_a_static_cache_per_doubling() -> None:
    assert [bucket(n) for n in (1, 200, 256, 257, 512, 513, 3000)] == [256, 256, 256, 512, 512, 1024, 4096]
    assert bucket(1) == FIRST_BUCKET


def _model(path: Path) -> tuple[Any, Any]:
    model: Any = AutoModelForCausalLM.from_pretrained(path)
    return model.eval(), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("arch", ["text_gpt2", "text_llama"])
def test_a_cpu_decodes_with_plain_generate_and_compiles_nothing(tiny_models: Any, arch: str) -> None:
    model, tokenizer = _model(getattr(tiny_models, arch))
    decoding = Decoding.for_model(model)
    assert decoding == Decoding(static=False, compiled=False)
    assert decoding.options(model, 100) == {}
    stages: list[str] = []
    prepare(model, tokenizer, lambda stage, progress, message: stages.append(stage))
    assert stages == []


LONG_PROMPT = "The cat sat on the mat and then " * 30


@pytest.mark.parametrize(("arch", "prompts", "buckets"), [
    ("text_gpt2", ["Once upon a time"], [256]),
    ("text_llama", ["Once upon a time", LONG_PROMPT], [256, 512]),
])
def test_the_static_cache_decodes_as_plain_generate_and_is_reused(tiny_models: Any, arch: str, prompts: list[str],
                                                                  buckets: list[int]) -> None:
    """Greedy output through the bucketed static cache (uncompiled here) equals plain
    ``generate``'s, in each bucket, and again once the bucket's cache is reused. (Llama's rotary
    positions go past its 256; GPT-2's context ends there.)"""
    model, tokenizer = _model(getattr(tiny_models, arch))
    static = Decoding(static=True, compiled=False)
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        common: dict[str, Any] = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 20,
                                  "do_sample": False, "pad_token_id": 0}
        plain = model.generate(ids, **common)
        for _ in range(2):
            assert torch.equal(model.generate(ids, **common, **static.options(model, ids.shape[1] + 20)), plain)
    assert sorted(model.__dict__["_mymps_static_caches"]) == buckets


def test_a_seeded_generation_leaves_the_sessions_random_numbers_alone(client: Client, tiny_models: Any) -> None:
    """The seed of a request seeds that generation only: code in a session that seeded torch
    itself draws the same numbers whether or not a seeded generation ran in between."""
    name = str(tiny_models.text_llama)
    client.load_model(name, progress=False)

    def seed() -> None:
        torch.manual_seed(1234)

    def draw() -> list[float]:
        return torch.rand(3).tolist()

    client.run(seed)
    alone = client.run(draw)
    client.run(seed)
    client.generate(name, "Once upon a time", max_new_tokens=5, temperature=1.0, seed=7)
    assert client.run(draw) == alone
