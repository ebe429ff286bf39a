"""Answer extraction and scoring for the Math10K protocol (LLM-Adapters; docs/METHODS.md, Evaluation).

Numeric sets (GSM8K, SVAMP, MAWPS): commas removed, the **last** match of ``-?\\d+\\.?\\d*`` is the prediction;
correct if ``|pred - label| <= 1e-3``; no number is wrong. A fraction such as ``5/2`` is read, like in the
LLM-Adapters script, as its last number (``2``): the protocol is reproduced, not improved. ``$18.00`` reads 18.0.

A negative sign is kept (``-3``), a currency sign is ignored, and a trailing full stop is harmless (``18.`` is 18).

AQuA (choice): ``variant="llm-adapters"`` takes the first capital letter A–E in the response, as the original
script does (so "After checking, the answer is E" reads ``A``); ``variant="strict"`` takes the letter of the last
"answer is (X)" / "answer is X" phrase (any case, parentheses optional), falling back to the last option marker
such as ``C)`` or ``(C)``, else ``None``. The variant only matters for ``kind="choice"``.
"""

from __future__ import annotations

import re

_NUM = re.compile(r"-?\d+\.?\d*")
_ANSWER_IS = re.compile(r"answer is:?\s*\(?([A-Ea-e])\)?(?![A-Za-z])")
_MARKER = re.compile(r"\(([A-E])\)|(?<![A-Za-z])([A-E])\)")
VARIANTS = ("llm-adapters", "strict")


def extract_answer(text: str, kind: str, variant: str = "llm-adapters") -> float | str | None:
    """The prediction in a model response: a float (``kind="numeric"``), an option letter (``"choice"``) or
    ``None`` when there is none."""
    if kind == "numeric":
        nums = _NUM.findall(text.replace(",", ""))
        if not nums:
            return None
        try:
            return float(nums[-1])
        except ValueError:
            return None
    if kind == "choice":
        if variant == "llm-adapters":
            m = re.search(r"[A-E]", text)
            return m.group(0) if m else None
        if variant == "strict":
            hits = _ANSWER_IS.findall(text)
            if hits:
                return hits[-1].upper()
            markers = [a or b for a, b in _MARKER.findall(text)]
            return markers[-1] if markers else None
        raise ValueError(f"unknown variant {variant!r}; use 'llm-adapters' or 'strict'")
    raise ValueError(f"unknown kind {kind!r}; use 'numeric' or 'choice'")


def is_correct(pred: float | str | None, label: float | str, kind: str) -> bool:
    """Score one prediction against its label (numbers within 1e-3; letters equal)."""
    if pred is None:
        return False
    if kind == "numeric":
        try:
            return abs(float(pred) - float(str(label).replace(",", ""))) <= 1e-3
        except ValueError:
            return False
    if kind == "choice":
        return str(pred).strip().upper() == str(label).strip().upper()
    raise ValueError(f"unknown kind {kind!r}; use 'numeric' or 'choice'")


def score_generation(generation: str, label: str, kind: str, variant: str = "llm-adapters"
                     ) -> tuple[float | str | None, bool]:
    """``(extracted, correct)`` for one model response: the extraction and the scoring every caller shares."""
    pred = extract_answer(generation, kind, variant)
    return pred, is_correct(pred, label, kind)
