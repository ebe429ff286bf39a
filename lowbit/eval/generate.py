"""Batched greedy generation with left padding and KV cache, sorted by length, stopping at EOS or at the start of
a new ``### Instruction``."""

from __future__ import annotations

import torch
from torch import nn

STOP_STRINGS = ("### Instruction",)


def truncate_at_stop(text: str, stops: tuple[str, ...] = STOP_STRINGS) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text[:cut] if cut >= 0 else text


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 128, batch_size: int = 32,
             num_beams: int = 1) -> list[str]:
    """Greedy (or beam) continuations of ``prompts``, in input order; the prompt itself is not returned."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items()}
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = gen[:, enc["input_ids"].shape[1]:]
        for i, row in zip(idx, new):
            out[i] = truncate_at_stop(tokenizer.decode(row, skip_special_tokens=True))
    model.train(was_training)
    return out
