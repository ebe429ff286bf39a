"""Held-out response loss: the teacher-forced mean NLL of a test record's reference response given its prompt.

For a record with prompt ``p`` (the protocol's template applied to the instruction) and reference response ``r``
(the rationale ending in "The answer is X."), the loss is ``-(1/|r|) Σ_t log P(r_t | p, r_<t)`` over the response
tokens and the EOS that training appends — exactly what fine-tuning minimises (:mod:`lowbit.data.tokenize` builds
both), on held-out data. Generation accuracy of a small model sits near the floor and is dominated by sampling
noise; the loss separates methods at those budgets and scales. Reported token-weighted over the set (``loss``) and
as the mean of per-record means (``record_mean``), with per-record values for paired comparisons. Records without a
reference rationale (empty ``output``, e.g. the MAWPS test file) cannot be scored and are counted as skipped.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..data.tokenize import IGNORE_INDEX, CausalLMCollator, LongPromptError, tokenize_example


@torch.no_grad()
def response_loss(model: nn.Module, tokenizer, records: list[dict], variant: str = "apiq", max_length: int = 1024,
                  batch_size: int = 8) -> dict:
    """Teacher-forced response NLL of ``records`` ``[{instruction, input?, output}]`` under ``model``.

    Returns ``{"loss", "record_mean", "ppl", "n", "tokens", "skipped", "per_record": [(index, mean NLL, tokens)]}``;
    ``loss`` is token-weighted (``ppl = exp(loss)``). Raises ``ValueError`` when no record has a reference response.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    examples, index, skipped = [], [], 0
    for i, r in enumerate(records):
        if not str(r.get("output", "")).strip():
            skipped += 1
            continue
        try:
            ex = tokenize_example(r, tokenizer, max_length, variant)
        except LongPromptError:
            skipped += 1
            continue
        examples.append(ex)
        index.append(i)
    if not examples:
        raise ValueError(f"none of the {len(records)} records has a reference response (an 'output' rationale) "
                         f"within max_length={max_length}; the response loss needs one")
    collate = CausalLMCollator(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_record = []
    try:
        for s in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[s: s + batch_size]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
            labels = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
            logits = logits if logits.dtype == torch.float64 else logits.float()  # bf16 logits: score in fp32
            nll = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels,
                                              ignore_index=IGNORE_INDEX, reduction="none")  # (B, T-1)
            mask = labels != IGNORE_INDEX
            for b in range(nll.shape[0]):
                k = int(mask[b].sum())
                per_record.append((index[s + b], float(nll[b][mask[b]].sum()) / k, k))
    finally:
        model.train(was_training)
    tokens = sum(k for _, _, k in per_record)
    loss = sum(m * k for _, m, k in per_record) / tokens
    return {"loss": loss, "record_mean": sum(m for _, m, _ in per_record) / len(per_record), "ppl": math.exp(loss),
            "n": len(per_record), "tokens": tokens, "skipped": skipped, "per_record": per_record}
