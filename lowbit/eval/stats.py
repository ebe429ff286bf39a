"""Confidence intervals for repeated runs: the mean over seeds with Student's t interval, and the paired difference
of two methods trained on the same seeds (same data order, same adapter initialisation stream).

With ``n`` runs the 95% interval is ``mean ± t(0.975, n-1) · s / sqrt(n)``: with 3 seeds ``t = 4.30``, so only
large or very consistent differences resolve. Pairing removes the seed-to-seed variation both methods share
(the data order), which is why matched comparisons use :func:`paired_ci` rather than two separate intervals.
Intervals that also cover the draw of test problems (a seeds × problems table) are in :mod:`lowbit.eval.crossed`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Two-sided 95% quantiles t(0.975, df) of Student's t distribution, df = 1..30; beyond 30 the normal's 1.96 is
# within 2% of the exact value.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
         2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (``df >= 1``)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_ci(values: Sequence[float]) -> dict:
    """``{"mean", "half", "lo", "hi", "n", "sd"}`` of ``values`` (one per seed): the 95% t interval
    ``mean ± half``. One value gives ``half = None`` (no interval: one run is an anecdote)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_ci needs at least one value")
    n = len(xs)
    mean = sum(xs) / n
    if n == 1:
        return {"mean": mean, "half": None, "lo": None, "hi": None, "n": 1, "sd": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "half": half, "lo": mean - half, "hi": mean + half, "n": n, "sd": sd}


def paired_ci(a: dict, b: dict) -> dict:
    """The paired difference ``a - b`` over the seeds both hold (``{seed: value}`` each): :func:`mean_ci` of the
    per-seed differences, plus ``"seeds"`` and ``"verdict"``: ``"a > b"`` / ``"a < b"`` when the interval
    excludes zero, else ``"unresolved"`` (also with fewer than two common seeds)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("no seed in common: the two methods were not run on the same seeds")
    ci = mean_ci([a[s] - b[s] for s in seeds])
    ci["seeds"] = seeds
    ci["verdict"] = verdict(ci)
    return ci


def verdict(ci: dict) -> str:
    """``"a > b"``, ``"a < b"`` or ``"unresolved"`` for a difference's interval."""
    if ci["half"] is None:
        return "unresolved"
    if ci["lo"] > 0:
        return "a > b"
    if ci["hi"] < 0:
        return "a < b"
    return "unresolved"


def fmt_ci(ci: dict, spec: str = ".1f") -> str:
    """``"12.3 ± 4.5"`` (or the mean alone with ``(n=1)`` when there is no interval)."""
    if ci["half"] is None:
        return f"{ci['mean']:{spec}} (n=1)"
    return f"{ci['mean']:{spec}} ± {ci['half']:{spec}}"


def bootstrap_paired(diffs: Sequence[Sequence[float]], reps: int = 2000, seed: int = 0) -> dict:
    """Two-level paired bootstrap of a mean difference over seeds **and** test problems.

    ``diffs``: ``(seeds, problems)`` per-problem differences ``a - b`` (the same problems, in the same order, for
    every seed). Each replicate resamples seeds with replacement and, independently, problems with replacement (the
    same draw for every seed, since the problems are shared), so the interval covers both training-seed and
    test-sampling variation. Returns ``{"mean", "lo", "hi", "half", "n_seeds", "n_problems", "verdict"}`` with a 95%
    percentile interval (``half``: its half-width, for display).
    """
    import numpy as np

    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"diffs must be a non-empty (seeds, problems) table, got shape {d.shape}")
    rng = np.random.default_rng(seed)
    s_idx = rng.integers(0, d.shape[0], size=(reps, d.shape[0]))
    p_idx = rng.integers(0, d.shape[1], size=(reps, d.shape[1]))
    means = np.array([d[s_idx[r]][:, p_idx[r]].mean() for r in range(reps)])
    lo, hi = np.percentile(means, [2.5, 97.5])
    ci = {"mean": float(d.mean()), "lo": float(lo), "hi": float(hi), "half": float(hi - lo) / 2,
          "n_seeds": int(d.shape[0]), "n_problems": int(d.shape[1])}
    ci["verdict"] = verdict(ci)
    return ci
