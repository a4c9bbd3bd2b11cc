"""A tiny causal language model with its tokenizer, built offline in about a second.

`mymps demo`, the tests and the benchmarks all load this one model, so the demo exercises the same
artifact as the test suite. It lives with the server because it needs the server's libraries
(torch, transformers, tokenizers); they are imported inside the builder, so importing this module
stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKEN", "VOCAB_SIZE", "Arch", "build_tiny_text_model"]

# A few paragraphs of plain English: enough for a byte-level BPE to learn real merges, so the
# tiny model's tokens decode to word pieces rather than single bytes.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun while the fox runs
through the field and into the forest. A small bird sings on the branch of an old tree.

Machine learning models learn patterns from data. A language model reads text one token at a
time and predicts the next token. When the model is small, its answers are short and strange,
but the words still come from the text it was trained on.

The server keeps models in memory so that every notebook cell can use them without loading
them again. The client sends a prompt, the server generates new tokens, and the tokens stream
back to the notebook as they are made. Loading a model takes time; generating a token is fast.

Once upon a time there was a little house by the river. In the house lived an old man and his
cat. Every morning the man made tea, and every evening the cat sat by the window and watched
the boats go by. The river was wide and the water was cold and clear.
"""

SPECIAL_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 500

Arch = Literal["gpt2", "llama"]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""The tiny tokenizer's chat template: each message as ``<|role|>``, its text and the end token,
then ``<|assistant|>`` for the reply, so ``POST /chat`` and the OpenAI endpoints work on the demo's
model as on a hub chat model."""


def build_tiny_text_model(directory: str | Path, arch: Arch = "gpt2", *, chat_template: bool = True) -> Path:
    """Build and save a tiny causal language model with its tokenizer, offline, in about a second.

    The tokenizer is a byte-level BPE trained in memory on a built-in English corpus (vocabulary
    of about 500), so any prompt tokenizes and every generated token decodes to text. The model
    has random weights (seeded, so runs repeat) and two layers: it writes nonsense, but real
    nonsense, through the same `AutoModelForCausalLM` / `AutoTokenizer` path as a hub model.

    Args:
        directory: where to save; created if missing. Load it with ``load_model(str(path))``.
        arch: ``"gpt2"`` or ``"llama"``, the two common decoder families.
        chat_template: give the tokenizer :data:`CHAT_TEMPLATE`; without one the model is a
            plain language model, as base models on the hub are (``/chat`` refuses it).

    Returns:
        The directory, as a `Path`.

    Raises:
        ValueError: ``arch`` is not one of the two.
        ImportError: the server extra (torch, transformers, tokenizers) is not installed.
    """
    if arch not in ("gpt2", "llama"):
        raise ValueError(f"arch must be 'gpt2' or 'llama', not {arch!r}")
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedModel,
        PreTrainedTokenizerFast,
    )

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS.split("\n\n"), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=bpe,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        unk_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        model_max_length=256,
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    special = tokenizer.convert_tokens_to_ids(SPECIAL_TOKEN)
    assert isinstance(special, int)
    vocab = len(tokenizer)

    torch.manual_seed(0)
    model: PreTrainedModel
    if arch == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                n_layer=2, n_head=2, n_embd=64, n_positions=256, vocab_size=vocab,
                bos_token_id=special, eos_token_id=special, pad_token_id=special,
            )
        )
    else:
        model = LlamaForCausalLM(
            LlamaConfig(
                num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=256, vocab_size=vocab,
                bos_token_id=special, eos_token_id=special, pad_token_id=special,
            )
        )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
