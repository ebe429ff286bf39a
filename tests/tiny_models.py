"""Test fixtures: random tiny LLaMA models and a local BPE tokenizer, built without any download."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from lowbit.models.tiny.tokenizer import build_tokenizer

_NAMES = ["Ann", "Ben", "Carla", "Dev", "Emma", "Farid", "Gina", "Hugo"]
_ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stickers", "cards", "shells"]


def arithmetic_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """``n`` short documents: arithmetic facts, equations and numbers in narrative text (deterministic)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        kind = rng.randrange(4)
        if kind == 0:
            docs.append(f"{a} + {b} = {a + b}.")
        elif kind == 1:
            hi, lo = max(a, b), min(a, b)
            docs.append(f"{hi} - {lo} = {hi - lo}.")
        elif kind == 2:
            docs.append(f"{a} * {b % 6} = {a * (b % 6)}.")
        else:
            name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
            docs.append(f"{name} has {a} {item} and finds {b} more, so {name} now has {a + b} {item}.")
    return docs


def make_tokenizer(corpus: list[str] | None = None, vocab_size: int = 320):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``corpus`` (digits always split)."""
    return build_tokenizer(corpus if corpus is not None else arithmetic_corpus(), vocab_size)


def random_llama(hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int | None = None,
                 vocab_size: int = 320, seed: int = 0, max_position_embeddings: int = 2048):
    """A randomly initialised ``LlamaForCausalLM`` (float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def save_random_llama(path: str | Path, **kwargs) -> Path:
    """Write a random tiny LLaMA, its tokenizer and a calibration text file (``calib.txt``) to ``path``."""
    path = Path(path)
    tok = make_tokenizer()
    model = random_llama(vocab_size=len(tok), **kwargs)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "calib.txt").write_text("\n\n".join(arithmetic_corpus(3000, seed=1)))
    return path
