"""Confidence intervals against mathematics: the t quantiles against a numerical integration of Student's density,
the interval on hand-computable data, and pairing's effect."""

import math
from statistics import NormalDist

import numpy as np
import pytest

from lowbit.eval.stats import fmt_ci, mean_ci, paired_ci, t975, verdict


def _t_cdf(x: float, df: float, steps: int = 20000) -> float:
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


# --- Student's t for real df, the crossed seeds × problems interval, Holm, equivalence, seeds needed -------------

@pytest.mark.parametrize("p, df, table", [(0.975, 10, 2.228), (0.975, 2, 4.303), (0.995, 5, 4.032),
                                          (0.975, 1, 12.706), (0.95, 20, 1.725), (0.975, 1e6, 1.960)])
def test_t_quantile_matches_printed_tables(p, df, table):
    from lowbit.eval.crossed import t_cdf, t_quantile

    q = t_quantile(p, df)
    assert q == pytest.approx(table, abs=6e-4)
    assert t_cdf(q, df) == pytest.approx(p, abs=1e-11)
    assert t_quantile(1 - p, df) == pytest.approx(-q, rel=1e-12)  # symmetry


def test_t_quantile_agrees_with_the_t975_table_for_every_df():
    from lowbit.eval.crossed import t_quantile

    for df in range(1, 31):
        assert t_quantile(0.975, df) == pytest.approx(t975(df), abs=6e-4)


@pytest.mark.parametrize("df", [0.5, 1.0, 2.5, 4.57, 7.3, 29.9])
@pytest.mark.parametrize("x", [0.3, 1.0, 2.7])
def test_t_cdf_against_the_integrated_density_at_real_df(df, x):
    from lowbit.eval.crossed import t_cdf

    assert t_cdf(x, df) == pytest.approx(_t_cdf(x, df), abs=1e-9)
    assert t_cdf(-x, df) == pytest.approx(1 - _t_cdf(x, df), abs=1e-9)


def test_t_cdf_edges_and_refusals():
    from lowbit.eval.crossed import t_cdf, t_quantile

    assert t_cdf(0.0, 3) == 0.5 and t_cdf(0.0, 0.7) == 0.5 and t_quantile(0.5, 4) == 0.0
    assert t_cdf(math.inf, 2) == 1.0 and t_cdf(-math.inf, 2) == 0.0
    # Cauchy (df = 1) in closed form, far tail included: P(T > t) = 1/2 - atan(t)/π.
    for t in (0.5, 3.0, 1e4):
        assert t_cdf(-t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, rel=1e-10)
    assert t_quantile(0.9999, 1) == pytest.approx(math.tan(math.pi * (0.9999 - 0.5)), rel=1e-9)
    for bad in (0, -1, math.inf, math.nan):
        with pytest.raises(ValueError, match="degrees of freedom"):
            t_cdf(1.0, bad)
    with pytest.raises(ValueError, match="p must be"):
        t_quantile(1.0, 3)


def test_betainc_against_closed_forms():
    from lowbit.eval.crossed import betainc

    for x in (0.0, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0):
        assert betainc(1, 1, x) == pytest.approx(x, abs=1e-14)
        assert betainc(3.5, 1, x) == pytest.approx(x ** 3.5, abs=1e-14)
        assert betainc(1, 2.5, x) == pytest.approx(1 - (1 - x) ** 2.5, abs=1e-14)
        assert betainc(0.5, 0.5, x) == pytest.approx(2 / math.pi * math.asin(math.sqrt(x)), abs=1e-13)


# A 3 × 4 table worked by hand: seed means 2.5, 4, 2; problem means 1, 3, 4, 10/3; grand mean 17/6.
# MS_seed = 4·(4+49+25)/36/2 = 13/3, MS_problem = 3·(121+1+49+9)/36/3 = 5, MS_resid = (77/3 - 26/3 - 15)/6 = 1/3.
HAND = [[1.0, 2.0, 4.0, 3.0], [2.0, 4.0, 5.0, 5.0], [0.0, 3.0, 3.0, 2.0]]


def test_crossed_ci_by_hand():
    from lowbit.eval.crossed import crossed_ci, t_cdf, t_quantile

    ci = crossed_ci(HAND)
    assert ci["mean"] == pytest.approx(17 / 6) and (ci["n_seeds"], ci["n_problems"]) == (3, 4)
    assert ci["var_seed"] == pytest.approx((13 / 3 - 1 / 3) / 4)  # 1
    assert ci["var_problem"] == pytest.approx((5 - 1 / 3) / 3)  # 14/9
    assert ci["var_resid"] == pytest.approx(1 / 3)
    assert ci["se"] == pytest.approx(math.sqrt((13 / 3 + 5 - 1 / 3) / 12))  # √0.75
    # Satterthwaite: 9² / ((13/3)²/2 + 5²/3 + (1/3)²/6) = 4374/958
    assert ci["df"] == pytest.approx(4374 / 958)
    assert ci["half"] == pytest.approx(t_quantile(0.975, 4374 / 958) * math.sqrt(0.75))
    assert (ci["lo"], ci["hi"]) == pytest.approx((17 / 6 - ci["half"], 17 / 6 + ci["half"]))
    assert ci["p"] == pytest.approx(2 * (1 - t_cdf(17 / 6 / math.sqrt(0.75), 4374 / 958)))
    assert ci["verdict"] == "a > b" and ci["p"] < 0.05
    assert crossed_ci(-np.asarray(HAND))["verdict"] == "a < b"
    narrower = crossed_ci(HAND, level=0.90)
    assert narrower["half"] < ci["half"] and narrower["se"] == ci["se"]


def test_crossed_ci_truncates_a_negative_component_at_zero():
    """Seeds with identical means: MS_seed = 0 < MS_resid, so the seed component is 0 (not negative), the variance
    is the problem term's (MS_problem / (S·P)) and the df are the problems' (P - 1)."""
    from lowbit.eval.crossed import crossed_ci

    # Both rows average 8; problem means 2, 2, 14, 14 (MS_problem = 2·4·36/3 = 96); residuals ±1, ±2 (MS = 20/3).
    x = np.array([[1.0, 3.0, 12.0, 16.0], [3.0, 1.0, 16.0, 12.0]])
    ci = crossed_ci(x)
    assert ci["var_seed"] == 0.0 and ci["df"] == pytest.approx(3.0)
    assert ci["var_problem"] == pytest.approx((96 - 20 / 3) / 2) and ci["var_resid"] == pytest.approx(20 / 3)
    assert ci["se"] == pytest.approx(math.sqrt(96 / 8))
    # Nothing but residual: both components truncated, the residual term alone with its (S-1)(P-1) df.
    flat = crossed_ci(np.array([[1.0, -1.0, 2.0, -2.0], [-1.0, 1.0, -2.0, 2.0]]))
    assert flat["var_seed"] == flat["var_problem"] == 0.0 and flat["df"] == pytest.approx(3.0)
    assert flat["se"] == pytest.approx(math.sqrt(20 / 3 / 8))


def test_crossed_ci_one_seed_is_an_anecdote_and_one_problem_is_the_seed_t_interval():
    from lowbit.eval.crossed import crossed_ci

    one = crossed_ci([[0.1, 0.3, 0.2]])
    assert one["mean"] == pytest.approx(0.2) and one["verdict"] == "unresolved"
    assert all(one[k] is None for k in ("half", "lo", "hi", "p", "se", "df", "var_seed"))
    assert fmt_ci(one) == "0.2 (n=1)"
    seeds = [0.4, 0.1, 0.9, 0.5]
    col, ref = crossed_ci([[v] for v in seeds]), mean_ci(seeds)
    assert col["mean"] == pytest.approx(ref["mean"]) and col["df"] == 3
    assert col["half"] == pytest.approx(ref["half"], rel=1e-3)  # the table's t975 is rounded to 3 decimals
    assert col["var_seed"] == pytest.approx(ref["sd"] ** 2) and col["var_problem"] is None


def test_crossed_ci_constant_table_and_refusals():
    from lowbit.eval.crossed import crossed_ci

    ci = crossed_ci([[2.0] * 5, [2.0] * 5])
    assert ci["mean"] == ci["lo"] == ci["hi"] == 2.0 and ci["half"] == 0.0 and ci["p"] == 0.0
    assert ci["verdict"] == "a > b"
    assert crossed_ci([[0.0] * 3] * 2)["p"] == 1.0
    for bad in ([1.0, 2.0], [[]], [[1.0, math.nan], [1.0, 2.0]]):
        with pytest.raises(ValueError):
            crossed_ci(bad)
    with pytest.raises(ValueError, match="level"):
        crossed_ci(HAND, level=95)


def test_crossed_ci_p_value_agrees_with_the_interval():
    from lowbit.eval.crossed import crossed_ci

    rng = np.random.default_rng(5)
    for _ in range(50):
        x = rng.normal(0.02, 0.05, (3, 1)) + rng.normal(0, 0.1, (1, 40)) + rng.normal(0, 0.1, (3, 40))
        ci = crossed_ci(x)
        assert (ci["p"] < 0.05) == (ci["verdict"] != "unresolved")


def test_crossed_ci_recovers_the_variance_components():
    from lowbit.eval.crossed import crossed_ci

    rng = np.random.default_rng(11)
    x = 1.0 + rng.normal(0, 0.3, (300, 1)) + rng.normal(0, 0.5, (1, 300)) + rng.normal(0, 0.2, (300, 300))
    ci = crossed_ci(x)
    assert ci["var_seed"] == pytest.approx(0.09, rel=0.2)
    assert ci["var_problem"] == pytest.approx(0.25, rel=0.2)
    assert ci["var_resid"] == pytest.approx(0.04, rel=0.02)


# --- coverage by simulation: many studies with a known population mean -----------------------------------------

def _continuous(rng, n: int, s: int, p: int, sd_seed: float, sd_problem: float, sd_resid: float, mu: float):
    """``(n, s, p)``: n studies of the crossed model x = μ + a_s + b_p + e_sp, fresh seeds and problems each."""
    return (mu + rng.normal(0, sd_seed, (n, s, 1)) + rng.normal(0, sd_problem, (n, 1, p))
            + rng.normal(0, sd_resid, (n, s, p)))


def _expit(z):
    return 1.0 / (1.0 + np.exp(-z))


# Two methods scored right/wrong on shared problems: P(correct) = expit(skill + seed shift - difficulty), difficulty
# ~ N(0, 1.5²) per problem, each method's seed shift ~ N(0, 0.15²) with correlation 0.5 between the two methods on
# the same seed (shared data order).
SKILL_A, SKILL_B, SD_SHIFT, RHO, SD_DIFFICULTY = 0.3, 0.0, 0.15, 0.5, 1.5


def _binary_differences(rng, n: int, s: int, p: int):
    """``(n, s, p)`` paired differences correct_a - correct_b in {-1, 0, 1}."""
    difficulty = rng.normal(0, SD_DIFFICULTY, (n, 1, p))
    z1, z2 = rng.normal(0, 1, (n, s, 1)), rng.normal(0, 1, (n, s, 1))
    shift_a, shift_b = SD_SHIFT * z1, SD_SHIFT * (RHO * z1 + math.sqrt(1 - RHO ** 2) * z2)
    a = rng.random((n, s, p)) < _expit(SKILL_A + shift_a - difficulty)
    b = rng.random((n, s, p)) < _expit(SKILL_B + shift_b - difficulty)
    return a.astype(np.float64) - b.astype(np.float64)


def _binary_truth() -> float:
    """The population mean difference: skill + shift - difficulty ~ N(skill, 0.15² + 1.5²), so each accuracy is
    E expit(N(skill, v)), integrated by 80-point Gauss–Hermite quadrature."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    z = math.sqrt(SD_SHIFT ** 2 + SD_DIFFICULTY ** 2) * nodes
    return float((weights * (_expit(SKILL_A + z) - _expit(SKILL_B + z))).sum() / weights.sum())


def _coverage(studies, truth: float) -> tuple[float, float]:
    """Fractions of the studies whose crossed interval, and whose t interval over per-seed means, hold ``truth``."""
    from lowbit.eval.crossed import crossed_ci

    crossed = seeds_only = 0
    for x in studies:
        ci, cs = crossed_ci(x), mean_ci(x.mean(axis=1))
        crossed += ci["lo"] <= truth <= ci["hi"]
        seeds_only += cs["lo"] <= truth <= cs["hi"]
    return crossed / len(studies), seeds_only / len(studies)


def test_binary_truth_by_monte_carlo():
    rng = np.random.default_rng(2)
    assert _binary_differences(rng, 1, 400, 4000).mean() == pytest.approx(_binary_truth(), abs=0.004)


@pytest.mark.parametrize("case, n_studies", [("continuous", 1000), ("few seeds", 2000), ("binary", 1000)])
def test_crossed_interval_covers_the_truth(case, n_studies):
    """95% intervals hold the population mean in 92-98% of simulated studies (measured: 0.950, 0.935, 0.961 over
    5000 studies each)."""
    rng = np.random.default_rng({"continuous": 0, "few seeds": 1, "binary": 2}[case])
    if case == "binary":
        studies, truth = _binary_differences(rng, n_studies, 12, 300), _binary_truth()
    else:
        studies = _continuous(rng, n_studies, 12 if case == "continuous" else 4, 400, 0.01, 0.05, 0.02, 0.003)
        truth = 0.003
    covered, _ = _coverage(studies, truth)
    assert 0.92 <= covered <= 0.98


def test_the_seed_only_interval_under_covers_when_problems_dominate():
    """Problem effects 0.3 (six times the continuous case's): every seed sees the same problems, so the per-seed
    means share their draw and the t interval over seeds misses it (measured 0.32); the crossed one does not."""
    rng = np.random.default_rng(3)
    crossed, seeds_only = _coverage(_continuous(rng, 400, 12, 400, 0.01, 0.3, 0.02, 0.003), 0.003)
    assert 0.92 <= crossed <= 0.98 and seeds_only < 0.6


# --- several contrasts, equivalence, planning ---------------------------------------------------------------------

def test_holm_by_hand_and_its_properties():
    from lowbit.eval.crossed import holm

    # sorted 0.005, 0.01, 0.03, 0.04 × 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 → running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.01, None, 0.04]) == [pytest.approx(0.02), None, pytest.approx(0.04)]
    assert holm([0.3, 0.6]) == [0.6, 0.6] and holm([0.2]) == [0.2] and holm([]) == [] and holm([None]) == [None]
    rng = np.random.default_rng(4)
    for _ in range(100):
        p = list(rng.random(rng.integers(1, 9)) ** 3)
        adj = holm(p)
        assert all(r <= a <= 1.0 for r, a in zip(p, adj))
        assert all(adj[i] <= adj[j] for i in range(len(p)) for j in range(len(p)) if p[i] <= p[j])
        assert min(adj) == pytest.approx(min(1.0, len(p) * min(p)))  # the smallest is Bonferroni's
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.1, 1.5])


def test_equivalent_needs_the_whole_interval_inside_the_margin():
    from lowbit.eval.crossed import crossed_ci, equivalent

    assert equivalent({"lo": -0.01, "hi": 0.02, "half": 0.015}, 0.02)
    assert not equivalent({"lo": -0.01, "hi": 0.03, "half": 0.02}, 0.02)
    assert not equivalent({"lo": -0.05, "hi": 0.0, "half": 0.025}, 0.02)
    assert not equivalent(crossed_ci([[0.0, 0.0]]), 1.0)  # one seed: no interval, no claim
    with pytest.raises(ValueError, match="margin"):
        equivalent({"lo": 0.0, "hi": 0.0}, -1.0)


def test_seeds_needed_by_hand_with_seed_variance_only():
    """σ = 1, δ = 0.5: the normal formula ((1.96 + 0.84)·σ/δ)² = 31.4 → 32; the t version (smallest n with
    (t(0.975, n-1) + t(0.8, n-1))·σ/√n <= δ) is a little larger."""
    from lowbit.eval.crossed import seeds_needed, t_quantile

    got = seeds_needed(1.0, 0.0, 0.0, 500, 0.5)
    z = NormalDist().inv_cdf
    normal = math.ceil(((z(0.975) + z(0.8)) / 0.5) ** 2)
    by_t = next(n for n in range(2, 1000) if (t_quantile(0.975, n - 1) + t_quantile(0.8, n - 1)) / math.sqrt(n) <= 0.5)
    assert got == by_t and normal == 32 and normal <= got <= normal + 3
    assert seeds_needed(1.0, 0.0, 0.0, 500, -0.5) == got  # the sign of the effect does not matter
    assert seeds_needed(0.0, 0.0, 0.0, 10, 0.1) == 2


def test_seeds_needed_is_monotone_and_knows_when_problems_are_the_limit():
    from lowbit.eval.crossed import seeds_needed

    base = {"var_seed": 1e-4, "var_problem": 2.5e-3, "var_resid": 4e-4, "n_problems": 400}
    by_effect = [seeds_needed(**base, effect=e) for e in (0.008, 0.01, 0.015, 0.02)]
    assert by_effect == sorted(by_effect, reverse=True) and by_effect[0] > by_effect[-1]
    by_var = [seeds_needed(**{**base, "var_seed": v}, effect=0.012) for v in (5e-5, 1e-4, 2e-4, 4e-4)]
    assert by_var == sorted(by_var) and by_var[0] < by_var[-1]
    by_power = [seeds_needed(**base, effect=0.012, power=w) for w in (0.5, 0.8, 0.9)]
    assert by_power == sorted(by_power) and by_power[0] < by_power[-1]
    by_problems = [seeds_needed(**{**base, "n_problems": p}, effect=0.012) for p in (200, 400, 1600)]
    assert by_problems == sorted(by_problems, reverse=True)
    # The problem term alone (se >= sqrt(2.5e-3 / 400) = 0.0025) needs |effect| >= 2.8·0.0025: no number of seeds helps.
    assert seeds_needed(**base, effect=0.006, max_seeds=200) is None
    with pytest.raises(ValueError):
        seeds_needed(-1.0, 0.0, 0.0, 10, 0.1)
    with pytest.raises(ValueError):
        seeds_needed(1.0, 0.0, 0.0, 10, 0.0)
