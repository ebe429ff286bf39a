"""Accuracy of a model on Math10K-format test records in memory (generation + the published answer extraction).

``lowbit evaluate`` (:mod:`lowbit.recipes.evaluate`) is the resumable, file-writing version of the same computation.
"""

from __future__ import annotations

from torch import nn

from ..data.prompts import format_prompt
from ..data.testsets import kind_of
from .answers import score_generation
from .generate import generate

__all__ = ["accuracy"]


def accuracy(model: nn.Module, tokenizer, records: list[dict], dataset: str, max_new_tokens: int = 96,
             batch_size: int = 32, variant: str = "llm-adapters", prompt_variant: str = "apiq",
             num_beams: int = 1) -> tuple[float, list[dict]]:
    """-> (accuracy in %, per-example rows with prompt, generation, extracted, label, correct).

    ``dataset`` picks the answer kind (``aqua``/``synthetic-aqua``: option letter, else a number); ``variant`` is
    the choice-extraction rule (``llm-adapters`` or ``strict``), ``prompt_variant`` the prompt template."""
    kind = kind_of(dataset)
    prompts = [format_prompt(r["instruction"], r.get("input", ""), prompt_variant) for r in records]
    gens = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    num_beams=num_beams)
    rows = []
    for r, p, g in zip(records, prompts, gens):
        pred, ok = score_generation(g, r["answer"], kind, variant)
        rows.append({"prompt": p, "generation": g, "extracted": pred, "label": r["answer"], "correct": ok})
    acc = 100.0 * sum(x["correct"] for x in rows) / max(1, len(rows))
    return acc, rows
