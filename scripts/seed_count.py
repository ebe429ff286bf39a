"""How many seeds a study's primary contrasts need, from the spread of the runs finished so far — blind to the
differences themselves (no mean is printed or used), so sizing the study cannot bias its answer.

    python scripts/seed_count.py study --out /work/runs/study --seeds 0 1 2 3 4 5 6 7

For each primary contrast and metric: the variance components of the paired per-problem differences over the given
seeds (seed, problem, residual; :func:`lowbit.eval.crossed.crossed_ci`) and the seeds needed to detect a
difference of one and of two equivalence margins with 80% power at alpha / (number of primary contrasts) (Bonferroni:
Holm's first step, the strictest); also the half-width the interval would have at the spec's seed count.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from lowbit.eval.crossed import crossed_ci, seeds_needed
from lowbit.experiments import load_spec
from lowbit.experiments.analysis import METRICS, problem_table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("--out", required=True, help="the experiment's output directory (its ledger)")
    ap.add_argument("--seeds", type=int, nargs="+", required=True, help="the finished seeds to size from")
    args = ap.parse_args(argv)
    spec = load_spec(args.spec)
    runs = [json.loads(p.read_text()) for p in sorted(Path(args.out, "ledger").glob("*.json"))]
    runs = {(r["cell"], r["seed"]): r for r in runs if r.get("tag") == "final" and r["seed"] in args.seeds}
    prim = [c for c in spec.contrasts if c.primary]
    alpha = spec.analysis.alpha / max(len(prim), 1)
    planned = len(spec.seeds or [None])
    print(f"| contrast | metric | seeds | σ²_seed | σ²_problem | σ²_resid | seeds for 1 margin | for 2 margins | "
          f"half-width at {planned} seeds |\n|---|---|---|---|---|---|---|---|---|")
    for c in prim:
        seeds = [s for s in args.seeds if (c.a, s) in runs and (c.b, s) in runs]
        for name, field, scale, _, _ in METRICS:
            margin = spec.analysis.margins.get(name)
            table = problem_table([runs[c.a, s] for s in seeds] + [runs[c.b, s] for s in seeds], field, scale)
            if margin is None or table is None or len(seeds) < 2:
                continue
            n = len(seeds)
            ci = crossed_ci([[x - y for x, y in zip(ra, rb)] for ra, rb in zip(table[1][:n], table[1][n:])])
            v = (ci["var_seed"], ci["var_problem"], ci["var_resid"])
            p = len(table[0])
            half = 1.96 * math.sqrt(v[0] / planned + v[1] / p + v[2] / (planned * p))
            need = [seeds_needed(*v, p, k * margin, alpha=alpha) for k in (1, 2)]
            print(f"| {c.a} − {c.b} | {name} | {n} | {v[0]:.3g} | {v[1]:.3g} | {v[2]:.3g} | "
                  f"{need[0] or '> 200'} | {need[1] or '> 200'} | ±{half:.3g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
