"""Text generation through ``model.generate``, streamed piece by piece, stoppable at every token.

transformers' own machinery does the work: its logits processors pick each token (the repetition
penalty, temperature, top-k, top-p, from :class:`Sampling`: the request's settings, else the
model's ``generation_config``'s), its KV cache, and on CUDA its static cache with the compiled
decoding step (``decoding.py``). What stays ours is one stopping criterion (:class:`_Watch`) that
turns each token into text for the stream (:class:`_Detokenizer`, which holds back what a stop
string could take back), and stops at an end token, a stop string, the budget or a cancel.

The original fed the whole sequence back for every token (quadratic, 29% of in-process speed);
a hand-written loop with the cache reached 104%; ``generate`` with the criterion is the same
code path as the in-process baseline.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mymps_magic import wire

from .decoding import Decoding
from .errors import BadRequest
from .registry import LoadedModel

OnText = Callable[[str], None]


def _eos_ids(model: Any) -> set[int]:
    """The ids that end a generation, chosen as ``model.generate`` chooses them."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _context(model: Any) -> int | None:
    """The context of a model with learned absolute positions (GPT-2's ``n_positions``): past it
    such a model fails with an index error, not an answer. Models with rotary positions (Llama's
    ``max_position_embeddings``) keep going past theirs, as ``model.generate`` lets them."""
    limit = getattr(model.config, "n_positions", None)
    return limit if isinstance(limit, int) else None


def _token_budget(context: int | None, prompt_tokens: int, max_new_tokens: int) -> int:
    """``max_new_tokens``, cut to what still fits the context."""
    if context is None:
        return max_new_tokens
    if prompt_tokens >= context:
        raise BadRequest(f"the prompt is {prompt_tokens} tokens but this model's context holds {context}; "
                         "shorten the prompt")
    return min(max_new_tokens, context - prompt_tokens)


_GENERATION_DEFAULTS: dict[str, Any] = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50,
                                        "repetition_penalty": 1.0}
"""transformers' own defaults for what a model's ``generation_config`` leaves unset."""


@dataclass(frozen=True)
class Sampling:
    """How each token is picked, every setting decided.

    Attributes:
        temperature: 0 for greedy decoding (the likeliest token), else the softmax temperature.
        top_p: keep the smallest set of likeliest tokens whose mass reaches it (1: all).
        top_k: keep the k likeliest tokens (0: all).
        repetition_penalty: a token already in the prompt or the output has its logit divided by
            it (multiplied when negative), as ``RepetitionPenaltyLogitsProcessor`` does (1: off).
    """

    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float

    @classmethod
    def decide(cls, params: wire.GenerateRequest, model: Any) -> Sampling:
        """The request's settings, and the model's ``generation_config``'s where it gives none.

        A request without a temperature samples only when the model's config says ``do_sample``
        (transformers' rule); a request with one samples unless it is 0 (the original's rule).
        """
        config = getattr(model, "generation_config", None)

        def model_says(name: str) -> Any:
            value = getattr(config, name, None)
            return _GENERATION_DEFAULTS[name] if value is None else value

        temperature = params.temperature
        if temperature is None:
            temperature = float(model_says("temperature")) if model_says("do_sample") else 0.0
        return cls(
            temperature=temperature,
            top_p=float(model_says("top_p") if params.top_p is None else params.top_p),
            top_k=int(model_says("top_k") if params.top_k is None else params.top_k),
            repetition_penalty=float(model_says("repetition_penalty") if params.repetition_penalty is None
                                     else params.repetition_penalty),
        )

    def options(self) -> dict[str, Any]:
        """The keyword arguments that make ``model.generate`` pick tokens this way, through its own
        logits processors."""
        if self.temperature <= 0:
            return {"do_sample": False, "repetition_penalty": self.repetition_penalty}
        return {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "repetition_penalty": self.repetition_penalty}


class _Detokenizer:
    """Turns token ids into text pieces that are safe to show.

    Holds back an incomplete UTF-8 character (decoded as U+FFFD) and any tail that could be the
    start of a stop string, so a client never sees text that is later taken back.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        # Decoding a short window (as text-generation-inference does) keeps each step O(1) and
        # keeps the spaces that SentencePiece drops at the start of a decode.
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # everything decoded so far
        self.sent = 0  # how much of ``text`` was handed out

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def add(self, token_id: int) -> tuple[str, bool]:
        """Add one token; return the new safe text and whether a stop string was reached."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        window = self._decode(self.ids[self.prefix_offset:])
        if len(window) <= len(prefix) or window.endswith("\ufffd"):
            return "", False
        self.text += window[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        for s in self.stop:
            index = self.text.find(s, max(0, self.sent - len(s)))
            if index != -1:
                self.text = self.text[:index]
                return self._flush(len(self.text)), True
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._flush(len(self.text) - hold), False

    def finish(self) -> str:
        return self._flush(len(self.text))

    def _flush(self, upto: int) -> str:
        piece = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece


class _Watch:
    """Sees each token as ``model.generate`` makes it: streams its text, and stops the generation
    at an end token, a stop string, the token budget or a cancel. A transformers
    ``StoppingCriteria`` by its call, without the base class, whose import would add a second to
    every server's start (transformers is imported on the first load instead).

    A stopping criterion rather than a streamer, because transformers 5.17 calls the criteria
    before the streamer: a stop string found by a streamer would be seen one token (one more
    forward pass) late. Reading the token costs one small copy from the device, the
    synchronisation ``generate`` already makes every step to check its own criteria.
    """

    def __init__(self, detok: _Detokenizer, eos: set[int], budget: int, is_cancelled: Callable[[], bool],
                 on_text: OnText | None, on_progress: Callable[[float], None] | None) -> None:
        self.detok, self.eos, self.budget = detok, eos, budget
        self.is_cancelled, self.on_text, self.on_progress = is_cancelled, on_text, on_progress
        self.produced = 0
        self.stop_reason = "max_tokens"

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = self._see(int(input_ids[0, -1]))
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    def _see(self, token: int) -> bool:
        self.produced += 1
        if token in self.eos:
            self.stop_reason = "eos"
            return True
        piece, stopped = self.detok.add(token)
        if piece and self.on_text is not None:
            self.on_text(piece)
        if self.on_progress is not None:
            self.on_progress(self.produced / self.budget)
        if stopped:
            self.stop_reason = "stop"
            return True
        if self.produced == self.budget:
            return True
        if self.is_cancelled():  # checked after each token: a cancelled generation ends at the next one
            self.stop_reason = "cancelled"
            return True
        return False


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int | None) -> Iterator[None]:
    """Sampling as ``generate`` does it, from torch's global generators, seeded for this generation
    only: their state is put back after it, so the sessions' code sees none of it."""
    if seed is None:
        yield
        return
    # fork_rng always keeps the CPU's generator; ``devices`` adds the accelerator's
    accelerators = [] if device.type == "cpu" else [device.index or 0]
    with torch.random.fork_rng(devices=accelerators, device_type="cuda" if device.type == "cpu" else device.type):
        torch.manual_seed(seed)
        yield


def generate(
    loaded: LoadedModel,
    params: wire.GenerateRequest,
    is_cancelled: Callable[[], bool],
    on_text: OnText | None = None,
    on_progress: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Generate up to ``max_new_tokens`` with ``model.generate``; returns the original's stats
    plus ``stop_reason`` and ``prompt_tokens`` (the prompt as the model read it: OpenAI's usage).

    ``stop_reason`` is ``eos``, ``stop`` (a stop string), ``max_tokens`` or ``cancelled``, the
    original's values. A ``max_tokens`` stop also says which limit in ``limit``: ``max_new_tokens``
    (the caller's budget), or ``context`` (the model's context was full before the budget was
    spent), which comes with a one-line ``message``. A new field rather than a new
    ``stop_reason`` value, so clients written for the original's four values keep working.
    """
    model, tokenizer = loaded.obj, loaded.tokenizer
    device = next(model.parameters()).device
    start = time.perf_counter()
    ids = tokenizer(params.prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        bos = getattr(tokenizer, "bos_token_id", None) or getattr(model.config, "bos_token_id", None) or 0
        ids = torch.tensor([[bos]])
    ids = ids.to(device)
    context = _context(model)
    budget = _token_budget(context, ids.shape[1], params.max_new_tokens)
    eos = _eos_ids(model)
    detok = _Detokenizer(tokenizer, params.stop)
    watch = _Watch(detok, eos, budget, is_cancelled, on_text, on_progress)
    pad = getattr(tokenizer, "pad_token_id", None)
    decoding = Decoding.for_model(model)
    from transformers import StoppingCriteriaList

    with _seeded(device, params.seed):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget,
                       stopping_criteria=StoppingCriteriaList([watch]),
                       pad_token_id=pad if pad is not None else min(eos, default=0),
                       **Sampling.decide(params, model).options(),
                       **decoding.options(model, ids.shape[1] + budget))
    tail = detok.finish()
    if tail and on_text is not None:
        on_text(tail)
    elapsed = time.perf_counter() - start
    loaded.touch()
    produced, stop_reason = watch.produced, watch.stop_reason
    result: dict[str, Any] = {
        "text": detok.text,
        "tokens_generated": produced,
        "time_s": round(elapsed, 4),
        "tokens_per_s": round(produced / elapsed, 2) if elapsed > 0 else 0.0,
        "stop_reason": stop_reason,
        "prompt_tokens": int(ids.shape[1]),
    }
    if stop_reason == "max_tokens":
        result["limit"] = "max_new_tokens" if budget == params.max_new_tokens else "context"
        if result["limit"] == "context":
            result["message"] = (f"the model's context ({context} tokens) is full: the prompt took "
                                 f"{ids.shape[1]} and {produced} were generated; shorten the prompt to get more")
    return result
