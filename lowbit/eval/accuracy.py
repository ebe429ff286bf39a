"""Accuracy of a model on Math10K-format test records (greedy generation + the published answer extraction)."""

from __future__ import annotations

from torch import nn

from ..data.prompts import format_prompt
from .answers import extract_answer, is_correct
from .generate import generate

CHOICE_SETS = ("aqua",)


def kind_of(dataset: str) -> str:
    return "choice" if dataset.lower() in CHOICE_SETS else "numeric"


def accuracy(model: nn.Module, tokenizer, records: list[dict], dataset: str, max_new_tokens: int = 96,
             batch_size: int = 32, variant: str = "llm-adapters") -> tuple[float, list[dict]]:
    """-> (accuracy in %, per-example rows with prompt, generation, extracted, label, correct)."""
    kind = kind_of(dataset)
    prompts = [format_prompt(r["instruction"], r.get("input", "")) for r in records]
    gens = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    rows = []
    for r, p, g in zip(records, prompts, gens):
        pred = extract_answer(g, kind, variant)
        rows.append({"prompt": p, "generation": g, "extracted": pred, "label": r["answer"],
                     "correct": is_correct(pred, r["answer"], kind)})
    acc = 100.0 * sum(x["correct"] for x in rows) / max(1, len(rows))
    return acc, rows
