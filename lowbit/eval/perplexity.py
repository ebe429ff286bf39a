"""Perplexity of a causal LM on held-out token ids (non-overlapping windows, as in the GPTQ paper's evaluation)."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
               batch_size: int = 4, progress: bool = False, desc: str = "perplexity") -> float:
    """``exp(mean token NLL)`` over non-overlapping ``seqlen`` windows of the 1-D ``ids`` (a shorter tail is
    scored too). Raises if ``ids`` holds fewer than 2 tokens. ``progress``: a bar over the windows, named ``desc``
    (a large model spends seconds per window)."""
    from tqdm.auto import tqdm

    ids = ids.flatten().long()
    if ids.numel() < 2:
        raise ValueError(f"need at least 2 held-out tokens for perplexity, got {ids.numel()}")
    windows = [ids[i: i + seqlen] for i in range(0, ids.numel(), seqlen)]
    windows = [w for w in windows if w.numel() >= 2]
    if max_windows is not None:
        windows = windows[:max_windows]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for w in tqdm(windows, desc=desc, unit="window", disable=not progress):
        x = w[None].to(device)
        logits = model(input_ids=x, use_cache=False).logits.float()
        loss = nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        nll += float(loss)
        count += x.shape[1] - 1
    model.train(was_training)
    return math.exp(nll / count)
