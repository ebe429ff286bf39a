"""An experiment's report, computed from its ledger entries alone: per cell the mean with a 95% t interval over seeds;
per contrast the paired difference over common seeds (t interval) and a two-level bootstrap over seeds **and test
problems** (accuracy; :func:`lowbit.eval.stats.bootstrap_paired`); the bases; the learning-rate search. Written as
``results.json`` and ``report.md``; where every cell ran once, also the per-set table ``comparison.md`` and chart
``comparison.png`` of ``lowbit compare``; with ``before: true``, the before → after table."""

from __future__ import annotations

import time
from pathlib import Path

from ..eval.stats import bootstrap_paired, fmt_ci, mean_ci, paired_ci
from ..io import atomic_write_json, atomic_write_text
from ..recipes.compare import compare_table, load_run, plot_runs
from .plots import before_after_table, plot_before_after, plot_cells
from .spec import ExperimentSpec

METRICS = (("acc_avg", "accuracy (%)", "higher"), ("loss_avg", "response loss", "lower"))


def cell_rows(spec: ExperimentSpec, plans: dict, runs: list[dict]) -> list[dict]:
    """Per cell with finished runs: label, bits, seeds, lr, trainable, mean ± CI of each metric and per set."""
    out = []
    for c in spec.cells:
        rs = [r for r in runs if r["cell"] == c.name]
        if not rs:
            continue
        q = plans[c.name].cfg.quant
        row = {"cell": c.name, "label": c.label, "bits": q.bits if q is not None else None,
               "seeds": [r["seed"] for r in rs], "lr": rs[0]["lr"], "trainable_params": rs[0]["trainable_params"],
               "train_time_s": sum(r["train_time_s"] for r in rs) / len(rs)}
        for key, _, _ in METRICS:
            vals = [r[key] for r in rs if r[key] is not None]
            row[key] = mean_ci(vals) if vals else None
        row["accuracy"] = {s: mean_ci([r["accuracy"][s] for r in rs]) for s in rs[0]["accuracy"]}
        row["loss"] = {s: mean_ci([r["loss"][s] for r in rs]) for s in rs[0]["loss"]}
        out.append(row)
    return out


def _problem_diffs(a: dict[object, dict], b: dict[object, dict], seeds: list) -> list[list[float]] | None:
    """``(seeds, problems)`` of correct(a) - correct(b) in points, over the problems both runs scored."""
    rows = []
    for s in seeds:
        pa, pb = a[s]["problems"], b[s]["problems"]
        d = []
        for name in sorted(set(pa) & set(pb)):
            ca = {x["index"]: x["correct"] for x in pa[name] if x["correct"] is not None}
            cb = {x["index"]: x["correct"] for x in pb[name] if x["correct"] is not None}
            d += [100.0 * (float(ca[i]) - float(cb[i])) for i in sorted(set(ca) & set(cb))]
        rows.append(d)
    return rows if rows and rows[0] and all(len(r) == len(rows[0]) for r in rows) else None


def contrast_rows(spec: ExperimentSpec, runs: list[dict]) -> list[dict]:
    """Per contrast with common seeds: paired differences (t over seeds; bootstrap over seeds and problems)."""
    by_cell: dict[str, dict] = {}
    for r in runs:
        by_cell.setdefault(r["cell"], {})[r["seed"]] = r
    out = []
    for c in spec.contrasts:
        a, b = by_cell.get(c.a, {}), by_cell.get(c.b, {})
        seeds = sorted(set(a) & set(b), key=lambda s: -1 if s is None else s)
        if not seeds:
            continue
        row = {"a": c.a, "b": c.b, "what": c.what, "different_bases": c.different_bases, "seeds": seeds}
        for key, _, better in METRICS:
            va = {s: a[s][key] for s in seeds if a[s][key] is not None}
            vb = {s: b[s][key] for s in seeds if b[s][key] is not None}
            row[key] = _with_winner(paired_ci(va, vb), better, c) if set(va) & set(vb) else None
        diffs = _problem_diffs(a, b, seeds)
        row["acc_bootstrap"] = _with_winner(bootstrap_paired(diffs), "higher", c) if diffs else None
        out.append(row)
    return out


def _with_winner(ci: dict, better: str, c) -> dict:
    sign = {"a > b": 1, "a < b": -1}.get(ci["verdict"], 0) * (1 if better == "higher" else -1)
    return {**ci, "better": {1: c.a, -1: c.b, 0: "unresolved"}[sign]}


def _ci(ci: dict | None, spec: str) -> str:
    return "–" if ci is None else fmt_ci(ci, spec)


def _boot(ci: dict | None) -> str:
    if ci is None:
        return "–"
    txt = f"{ci['mean']:.1f} [{ci['lo']:.1f}, {ci['hi']:.1f}]"
    return f"**{txt}**" if ci["better"] != "unresolved" else txt


def format_report(results: dict) -> str:
    """Markdown: budget line, bases, learning rates, cells, contrasts."""
    lines = [f"# {results['name']}", "", results.get("description") or "", ""]
    if results["bases"]:
        lines += ["| base | held-out ppl | weights (SHA-256) |", "|---|---|---|"]
        lines += [f"| {b['base']} | {'–' if b['ppl'] is None else format(b['ppl'], '.3f')} | "
                  f"{(b['weights_sha256'] or '–')[:12]} |" for b in results["bases"]] + [""]
    if results["learning_rates"]:
        lines += ["Learning rates: " + ", ".join(f"{g} {v:g}" for g, v in results["learning_rates"].items()), ""]
    lines += ["| bits | cell | trainable | lr | seeds | avg accuracy (95% t over seeds) | response loss |",
              "|---|---|---|---|---|---|---|"]
    for c in results["cells"]:
        lr = "recipe" if c["lr"] is None else f"{c['lr']:g}"
        lines.append(f"| {c['bits'] or 'fp'} | {c['label']} | {c['trainable_params']:,} | {lr} | {len(c['seeds'])} | "
                     f"{_ci(c['acc_avg'], '.1f')} | {_ci(c['loss_avg'], '.4f')} |")
    if results["contrasts"]:
        lines += ["", "Contrasts (a − b; **bold**: the 95% interval excludes zero). Accuracy bootstrap: over seeds "
                  "and test problems.", "", "| a | b | isolates | seeds | Δ accuracy, bootstrap [95%] | "
                  "Δ accuracy, t over seeds | Δ response loss | better (bootstrap) |", "|---" * 8 + "|"]
        for p in results["contrasts"]:
            lines.append(f"| {p['a']} | {p['b']} | {p['what']} | {len(p['seeds'])} | {_boot(p['acc_bootstrap'])} | "
                         f"{_ci(p['acc_avg'], '.1f')} | {_ci(p['loss_avg'], '.4f')} | "
                         f"{(p['acc_bootstrap'] or {}).get('better', 'unresolved')} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, spec: ExperimentSpec, plans: dict, runs: list[dict], rates: dict, search: list,
                 t0: float, complete: bool, bases: list[dict] | None = None) -> dict:
    """Compute the report from the finished runs and write it; returns ``results.json``'s content."""
    results = {"name": spec.name, "description": spec.description, "complete": complete, "bases": bases or [],
               "learning_rates": rates, "search": search, "cells": cell_rows(spec, plans, runs),
               "contrasts": contrast_rows(spec, runs),
               "runs": [{k: v for k, v in r.items() if k not in ("problems", "key")} for r in runs],
               "seconds_this_sitting": time.perf_counter() - t0}
    atomic_write_json(out / "results.json", results)
    report = format_report(results)
    if runs and all(len(c["seeds"]) == 1 for c in results["cells"]):  # one run per cell: lowbit compare's table
        loaded = [load_run(out / "runs" / r["run"]) for r in runs]
        table = compare_table(loaded)
        report += "\n" + table + "\n"
        atomic_write_text(out / "comparison.md", table + "\n")
        plot_runs(loaded, out / "comparison.png")
    if spec.before and runs:
        report += "\n" + before_after_table(runs) + "\n"
        plot_before_after(runs, out / "before_after.png")
    atomic_write_text(out / "report.md", report)
    if results["cells"]:
        plot_cells(results, out / "cells.png")
    if complete:
        print(report)
        print(f"({results['seconds_this_sitting']:.0f}s this sitting; results in {out})")
    return results
