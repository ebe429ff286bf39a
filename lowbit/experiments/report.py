"""An experiment's report, computed from its ledger entries alone (:mod:`.analysis`): per cell and per contrast the
estimate with its interval over seeds **and test problems**, the primary contrasts' Holm-adjusted p and verdicts,
the exploratory ones apart; the bases; the learning-rate search. Written as
``results.json`` and ``report.md``; where every cell ran once, also the per-set table ``comparison.md`` and chart
``comparison.png`` of ``lowbit compare``; with ``before: true``, the before → after table."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ..io import atomic_write_json, atomic_write_text
from ..recipes.compare import compare_table, load_run, plot_runs
from .analysis import METRICS, cell_rows, contrast_rows
from .plots import before_after_table, plot_before_after, plot_cells
from .spec import ExperimentSpec


def _ci(ci: dict | None, spec: str) -> str:
    if ci is None:
        return "–"
    if ci.get("half") is None:
        return f"{ci['mean']:{spec}} (n=1)"
    return f"{ci['mean']:{spec}} [{ci['lo']:{spec}}, {ci['hi']:{spec}}]"


def _p(v: float | None) -> str:
    return "–" if v is None else (f"{v:.2g}" if v >= 0.001 else "<0.001")


def _contrast_table(rows: list[dict], adjusted: bool) -> list[str]:
    head = "| a − b | question | seeds × problems (" + " / ".join(t for *_, t in METRICS) + ") |"
    for _, _, _, _, title in METRICS:
        head += f" Δ {title} [95%] | p |" + (" p (Holm) | verdict |" if adjusted else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        sizes = " / ".join(str((r[n] or {}).get("n_problems", "–")) for n, *_ in METRICS)
        line = f"| {r['a']} − {r['b']} | {r['what']} | {len(r['seeds'])} × {sizes} |"
        for name, _, _, _, _ in METRICS:
            ci, spec = r[name], ".4f" if name == "response_loss" else ".1f"
            line += f" {_ci(ci, spec)} | {_p((ci or {}).get('p'))} |"
            if adjusted:
                v = (ci or {}).get("verdict", "–")
                line += f" {_p((ci or {}).get('p_holm'))} | {'**' + v + '**' if v.endswith('better') else v} |"
        lines.append(line)
    return lines


def format_report(results: dict) -> str:
    """Markdown: description, bases, learning rates, cells, primary then exploratory contrasts."""
    lines = [f"# {results['name']}", "", results.get("description") or "", ""]
    if results["bases"]:
        lines += ["| base | held-out ppl | weights (SHA-256) |", "|---|---|---|"]
        lines += [f"| {b['base']} | {'–' if b['ppl'] is None else format(b['ppl'], '.3f')} | "
                  f"{(b['weights_sha256'] or '–')[:12]} |" for b in results["bases"]] + [""]
    if results["learning_rates"]:
        lines += ["Learning rates: " + ", ".join(f"{g} {v:g}" for g, v in results["learning_rates"].items()), ""]
    a = results.get("analysis") or {}
    lines += ["Per cell: mean over seeds and test problems with its 95% interval (crossed seeds × problems random "
              "effects, Satterthwaite t), so it covers a new draw of seeds and of problems.", "",
              "| bits | cell | trainable | lr | seeds | " + " | ".join(f"{t} [95%]" for *_, t in METRICS) + " |",
              "|---|---|---|---|---|" + "---|" * len(METRICS)]
    for c in results["cells"]:
        lr = "recipe" if c["lr"] is None else f"{c['lr']:g}"
        lines.append(f"| {c['bits'] or 'fp'} | {c['label']} | {c['trainable_params']:,} | {lr} | {len(c['seeds'])} | "
                     + " | ".join(_ci(c[n], ".4f" if n == "response_loss" else ".1f") for n, *_ in METRICS) + " |")
    prim = [r for r in results["contrasts"] if r["primary"]]
    rest = [r for r in results["contrasts"] if not r["primary"]]
    if prim:
        lines += ["", f"Pre-registered contrasts (a − b; Holm across these {len(prim)} per metric at "
                  f"{a.get('alpha', 0.05):g}; equivalence margins {a.get('margins', {})}; primary endpoint "
                  f"{a.get('primary_metric', 'response_loss')}). Verdict: the better cell when the Holm-adjusted p "
                  f"< alpha; equivalent when the interval lies inside the margin; else unresolved.", ""]
        lines += _contrast_table(prim, adjusted=True)
    if rest:
        lines += ["", "Exploratory contrasts (not pre-registered, no correction, no verdict; *pipeline*: the cells "
                  "differ in base as well as method).", ""]
        lines += _contrast_table(rest, adjusted=False)
    return "\n".join(lines) + "\n"


def write_report(out: Path, spec: ExperimentSpec, plans: dict, runs: list[dict], rates: dict, search: list,
                 t0: float, complete: bool, bases: list[dict] | None = None) -> dict:
    """Compute the report from the finished runs and write it; returns ``results.json``'s content."""
    results = {"name": spec.name, "description": spec.description, "complete": complete, "bases": bases or [],
               "learning_rates": rates, "search": search, "analysis": dataclasses.asdict(spec.analysis),
               "cells": cell_rows(spec, plans, runs),
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
