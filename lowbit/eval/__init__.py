"""Evaluation: the Math10K protocol's pure parts and perplexity. Imports nothing above ``lowbit.data``.

- ``config``: :class:`EvalConfig` — test sets, prompt variant, decoding, scoring rule.
- ``answers``: pure answer extraction and scoring (``extract_answer``, ``is_correct``, ``score_generation``).
- ``generate``: batched greedy / beam generation with left padding, KV cache and stop strings.
- ``results``: per-example rows (crash-safe reading, writing), per-set accuracy, the printed summary.
- ``accuracy``: accuracy of an in-memory model on in-memory records.
- ``compare``: the paper-shaped comparison table and bar chart over evaluation runs.
- ``perplexity``: perplexity on held-out token ids.

The drivers (``lowbit evaluate``) live in :mod:`lowbit.recipes.evaluate`. Importing this package loads neither
torch nor transformers; ``generate``, ``accuracy`` and ``perplexity`` do when imported.
"""

from .answers import extract_answer, is_correct, score_generation
from .config import EvalConfig

__all__ = ["EvalConfig", "extract_answer", "is_correct", "score_generation"]
