"""Confidence intervals against mathematics: the t quantiles against a numerical integration of Student's density,
the interval on hand-computable data, and pairing's effect."""

import math

import pytest

from lowbit.eval.stats import fmt_ci, mean_ci, paired_ci, t975, verdict


def _t_cdf(x: float, df: int, steps: int = 20000) -> float:
    """P(T <= x) for x > 0 by Simpson's rule on the density from 0 to x (float64)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    f = lambda t: c * (1 + t * t / df) ** (-(df + 1) / 2)  # noqa: E731
    h = x / steps
    s = f(0) + f(x) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, steps))
    return 0.5 + s * h / 3


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 19, 30])
def test_t_quantiles_are_the_0975_quantiles(df):
    assert _t_cdf(t975(df), df) == pytest.approx(0.975, abs=2e-5)


def test_large_df_uses_the_normal_and_bad_df_is_refused():
    assert t975(200) == 1.96
    with pytest.raises(ValueError, match="degrees of freedom"):
        t975(0)


def test_mean_ci_by_hand():
    ci = mean_ci([1.0, 2.0, 3.0])  # mean 2, sd 1, half = 4.303 / sqrt(3)
    assert ci["mean"] == 2.0 and ci["sd"] == pytest.approx(1.0)
    assert ci["half"] == pytest.approx(4.303 / math.sqrt(3))
    assert (ci["lo"], ci["hi"]) == pytest.approx((2 - ci["half"], 2 + ci["half"]))
    one = mean_ci([5.0])
    assert one["half"] is None and verdict(one) == "unresolved" and fmt_ci(one) == "5.0 (n=1)"
    with pytest.raises(ValueError):
        mean_ci([])


def test_pairing_removes_the_shared_seed_effect():
    """b = a - 1 + tiny noise on seeds whose level varies a lot: the unpaired intervals overlap, the paired
    difference resolves."""
    a = {0: 10.0, 1: 30.0, 2: 50.0, 3: 20.0}
    b = {0: 9.1, 1: 28.9, 2: 49.0, 3: 19.0}
    ca, cb = mean_ci(list(a.values())), mean_ci(list(b.values()))
    assert ca["lo"] < cb["hi"]  # separately: unresolved
    d = paired_ci(a, b)
    assert d["seeds"] == [0, 1, 2, 3] and d["verdict"] == "a > b" and d["lo"] > 0
    assert paired_ci(b, a)["verdict"] == "a < b"
    assert paired_ci({0: 1.0, 1: 2.0}, {0: 2.0, 1: 1.0})["verdict"] == "unresolved"
    # only common seeds count; none in common is an error
    assert paired_ci({0: 1.0, 5: 9.0}, {0: 0.5})["n"] == 1
    with pytest.raises(ValueError, match="same seeds"):
        paired_ci({0: 1.0}, {1: 1.0})


def test_bootstrap_paired_constant_difference_has_no_width():
    from lowbit.eval.stats import bootstrap_paired

    ci = bootstrap_paired([[2.0] * 50, [2.0] * 50])
    assert ci["mean"] == ci["lo"] == ci["hi"] == 2.0 and ci["verdict"] == "a > b"


def test_bootstrap_paired_one_seed_matches_the_normal_interval_over_problems():
    """One seed: the bootstrap over problems approaches mean ± 1.96·sd/√n (400 problems, ±100-point differences)."""
    import random
    import statistics

    from lowbit.eval.stats import bootstrap_paired

    rng = random.Random(1)
    d = [rng.choice([-100.0, 0.0, 0.0, 100.0]) + (100.0 if rng.random() < 0.05 else 0.0) for _ in range(400)]
    ci = bootstrap_paired([d], reps=4000, seed=3)
    half = 1.96 * statistics.stdev(d) / len(d) ** 0.5
    assert abs(ci["half"] - half) / half < 0.1
    assert abs((ci["lo"] + ci["hi"]) / 2 - statistics.fmean(d)) < 0.15 * half


def test_bootstrap_paired_covers_seed_variation_too():
    """Two seeds whose mean differences disagree (+10 and −10 points) give a wider interval than either seed's
    problems alone, and one that straddles zero."""
    from lowbit.eval.stats import bootstrap_paired

    a = [10.0] * 100 + [0.0] * 100
    b = [-10.0] * 100 + [0.0] * 100
    alone = bootstrap_paired([a], seed=0)
    both = bootstrap_paired([a, b], seed=0)
    assert both["hi"] - both["lo"] > alone["hi"] - alone["lo"] and both["verdict"] == "unresolved"
    assert alone["verdict"] == "a > b"
