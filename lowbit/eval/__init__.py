"""Evaluation (METHODS.md §4): the Math10K protocol and perplexity.

- ``answers``: pure answer extraction and scoring (``extract_answer``, ``is_correct``).
- ``generate``: batched greedy / beam generation with left padding, KV cache and stop strings.
- ``datasets``: the test sets (LLM-Adapters' files, or the synthetic families of the tiny model).
- ``accuracy``: accuracy of an in-memory model on in-memory records.
- ``run``: ``lowbit evaluate`` — resumable evaluation writing per-example JSONL and ``summary.json``.
- ``compare``: ``lowbit compare`` — the paper-shaped table and a bar chart over evaluation runs.
- ``perplexity``: perplexity on held-out token ids.
"""
