"""Text generation with the model's KV cache, streamed piece by piece, stoppable at every token.

The original streaming loop fed the whole sequence back for every token (quadratic, 29% of
in-process speed). Here the prompt is run once and each later step feeds one token with the
cache, as ``model.generate`` does, while keeping the loop ours so that every token can be streamed
and a cancel request is seen between two tokens.

Each token is picked as ``model.generate`` picks it (:class:`Sampling`): the repetition penalty
first (transformers' ``RepetitionPenaltyLogitsProcessor``), then, when sampling, the temperature,
top-k (``TopKLogitsWarper``) and top-p; settings the request leaves out are the model's
``generation_config``'s, so a Hugging Face model decodes here as it does in ``model.generate``.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mymps_magic import wire

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


def _cache_keyword(model: Any) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache``; speak whichever the model knows."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


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

    def pick(self, logits: torch.Tensor, seen: torch.Tensor | None, generator: torch.Generator | None) -> int:
        """The next token out of the last position's ``logits``; ``seen`` marks the ids so far
        (a bool per vocabulary entry, for the repetition penalty)."""
        logits = logits.float()
        if seen is not None and self.repetition_penalty != 1.0:
            penalised = torch.where(logits < 0, logits * self.repetition_penalty, logits / self.repetition_penalty)
            logits = torch.where(seen, penalised, logits)
        if self.temperature <= 0:
            return int(torch.argmax(logits, dim=-1).item())
        logits = logits / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            sorted_probs[(cumulative - sorted_probs) >= self.top_p] = 0.0
            choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
            return int(order[choice].item())
        return int(torch.multinomial(probs, 1, generator=generator).item())


def _seen(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """A bool per vocabulary entry, set for the ``ids`` of the prompt."""
    seen = torch.zeros(vocab, dtype=torch.bool, device=ids.device)
    seen[ids] = True
    return seen


def _generator(device: torch.device, seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    try:
        return torch.Generator(device=device).manual_seed(seed)
    except RuntimeError:  # a backend without device generators: sample from a CPU one
        return torch.Generator().manual_seed(seed)


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


def generate(
    loaded: LoadedModel,
    params: wire.GenerateRequest,
    is_cancelled: Callable[[], bool],
    on_text: OnText | None = None,
    on_progress: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Generate up to ``max_new_tokens``; returns the original's stats plus ``stop_reason``.

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
    generator = _generator(device, params.seed)
    sampling = Sampling.decide(params, model)
    detok = _Detokenizer(tokenizer, params.stop)
    stop_reason = "max_tokens"
    produced = 0
    cache_kw = _cache_keyword(model)
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        seen = _seen(ids[0], out.logits.shape[-1]) if sampling.repetition_penalty != 1.0 else None
        for _ in range(budget):
            token = sampling.pick(out.logits[0, -1, :], seen, generator)
            if seen is not None:
                seen[token] = True
            produced += 1
            if token in eos:
                stop_reason = "eos"
                break
            piece, stopped = detok.add(token)
            if piece and on_text is not None:
                on_text(piece)
            if on_progress is not None:
                on_progress(produced / budget)
            if stopped:
                stop_reason = "stop"
                break
            if produced == budget:
                break
            if is_cancelled():  # checked after each token: a cancelled generation ends at the next one
                stop_reason = "cancelled"
                break
            out = model(input_ids=torch.tensor([[token]], device=device), use_cache=True, **{cache_kw: out[cache_kw]})
    tail = detok.finish()
    if tail and on_text is not None:
        on_text(tail)
    elapsed = time.perf_counter() - start
    loaded.touch()
    result: dict[str, Any] = {
        "text": detok.text,
        "tokens_generated": produced,
        "time_s": round(elapsed, 4),
        "tokens_per_s": round(produced / elapsed, 2) if elapsed > 0 else 0.0,
        "stop_reason": stop_reason,
    }
    if stop_reason == "max_tokens":
        result["limit"] = "max_new_tokens" if budget == params.max_new_tokens else "context"
        if result["limit"] == "context":
            result["message"] = (f"the model's context ({context} tokens) is full: the prompt took "
                                 f"{ids.shape[1]} and {produced} were generated; shorten the prompt to get more")
    return result
