"""What an experiment's runs say, computed from their ledger entries alone.

Both metrics are analysed **per test problem**: accuracy as ``100 · correct`` and the response loss as the record's
mean per-token NLL, on the problems every run of the compared cells scored. A cell's estimate and a contrast's
paired difference ``a − b`` get the crossed seeds × problems interval of :func:`lowbit.eval.crossed.crossed_ci`, so
they cover a new draw of training seeds **and** of test problems. The primary (pre-registered) contrasts share a
Holm correction per metric at ``analysis.alpha`` and get one verdict each: the better cell when the adjusted p is
below alpha, ``equivalent (±m)`` when the interval lies inside the metric's margin, else ``unresolved``. The other
contrasts are exploratory (a *pipeline* difference when the bases differ): interval and unadjusted p, no verdict.
"""

from __future__ import annotations

from ..eval.crossed import crossed_ci, equivalent, holm
from ..eval.stats import mean_ci
from .spec import ExperimentSpec

#: (name in the spec's analysis, per-problem field, scale, the better direction, display name)
METRICS = (("response_loss", "loss", 1.0, "lower", "response loss"),
           ("accuracy", "correct", 100.0, "higher", "accuracy (%)"))


def problem_table(runs: list[dict], field: str, scale: float) -> tuple[list, list[list[float]]] | None:
    """``(problems, values)``: the ``(set, index)`` problems every run in ``runs`` measured ``field`` on, and a
    ``(runs, problems)`` table of ``scale · value``; ``None`` when they share none."""
    per_run = []
    for r in runs:
        vals = {}
        for name, rows in (r.get("problems") or {}).items():
            for x in rows:
                if x.get(field) is not None:
                    vals[(name, x["index"])] = scale * float(x[field])
        per_run.append(vals)
    if not per_run:
        return None
    common = sorted(set.intersection(*(set(v) for v in per_run)))
    return (common, [[v[p] for p in common] for v in per_run]) if common else None


def _by_cell(runs: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in runs:
        out.setdefault(r["cell"], {})[r["seed"]] = r
    return out


def cell_rows(spec: ExperimentSpec, plans: dict, runs: list[dict]) -> list[dict]:
    """Per cell with finished runs: label, bits, seeds, lr, trainable parameters, mean training seconds, per metric
    the crossed interval over seeds and problems, and per set the mean over seeds (t interval)."""
    out = []
    for c in spec.cells:
        rs = [r for r in runs if r["cell"] == c.name]
        if not rs:
            continue
        q = plans[c.name].cfg.quant
        row = {"cell": c.name, "label": c.label, "bits": q.bits if q is not None else None,
               "seeds": [r["seed"] for r in rs], "lr": rs[0]["lr"], "trainable_params": rs[0]["trainable_params"],
               "train_time_s": sum(r["train_time_s"] for r in rs) / len(rs)}
        for name, field, scale, _, _ in METRICS:
            table = problem_table(rs, field, scale)
            row[name] = None if table is None else {**crossed_ci(table[1]), "n_problems": len(table[0])}
        row["accuracy_by_set"] = {s: mean_ci([r["accuracy"][s] for r in rs]) for s in rs[0]["accuracy"]}
        row["loss_by_set"] = {s: mean_ci([r["loss"][s] for r in rs]) for s in rs[0]["loss"]}
        out.append(row)
    return out


def contrast_rows(spec: ExperimentSpec, runs: list[dict]) -> list[dict]:
    """Per contrast with common seeds, per metric: the paired difference ``a − b`` over common seeds and problems
    (crossed interval, p); primary contrasts: Holm-adjusted p and the verdict."""
    by_cell, out = _by_cell(runs), []
    for c in spec.contrasts:
        a, b = by_cell.get(c.a, {}), by_cell.get(c.b, {})
        seeds = sorted(set(a) & set(b), key=lambda s: -1 if s is None else s)
        if not seeds:
            continue
        row = {"a": c.a, "b": c.b, "what": c.what, "primary": c.primary, "different_bases": c.different_bases,
               "kind": "primary" if c.primary else ("pipeline" if c.different_bases else "exploratory"),
               "seeds": seeds}
        for name, field, scale, _, _ in METRICS:
            table = problem_table([a[s] for s in seeds] + [b[s] for s in seeds], field, scale)
            if table is None:
                row[name] = None
                continue
            n = len(seeds)
            diffs = [[x - y for x, y in zip(ra, rb)] for ra, rb in zip(table[1][:n], table[1][n:])]
            row[name] = {**crossed_ci(diffs), "n_problems": len(table[0])}
        out.append(row)
    _judge(spec, out)
    return out


def _judge(spec: ExperimentSpec, rows: list[dict]) -> None:
    """Holm across the primary contrasts per metric; one verdict per primary contrast and metric."""
    for name, _, _, better, _ in METRICS:
        prim = [r for r in rows if r["primary"] and r[name] is not None]
        for r, adj in zip(prim, holm([r[name]["p"] for r in prim])):
            ci, margin = r[name], spec.analysis.margins.get(name)
            ci["p_holm"] = adj
            if adj is not None and adj < spec.analysis.alpha:
                sign = 1 if ci["mean"] > 0 else -1
                ci["verdict"] = f"{r['a'] if sign * (1 if better == 'higher' else -1) > 0 else r['b']} better"
            elif margin is not None and equivalent(ci, margin):
                ci["verdict"] = f"equivalent (±{margin:g})"
            else:
                ci["verdict"] = "unresolved"
        for r in rows:
            if not r["primary"] and r[name] is not None:
                r[name]["verdict"] = r["kind"]  # no verdict outside the registered questions
