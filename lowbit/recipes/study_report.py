"""The study's statistics and report: per-cell means with 95% intervals over seeds, paired differences of matched
cells, a markdown table (``study.md``) and a chart with error bars (``study.png``)."""

from __future__ import annotations

from pathlib import Path

from ..eval.stats import fmt_ci, mean_ci, paired_ci

METRICS = (("acc_avg", "accuracy (%)", "higher"), ("loss_avg", "response loss", "lower"))


def summarize(cells: list, runs: list[dict], pairs: list[tuple[str, str, str]], bits: tuple[int, ...]) -> dict:
    """``{"cells": [...], "pairs": [...]}`` from the final runs' ledger entries."""
    by_cell: dict[str, dict[int, dict]] = {}
    for r in runs:
        by_cell.setdefault(r["cell"], {})[r["seed"]] = r
    out_cells = []
    for c in cells:
        rs = by_cell.get(c.name, {})
        if not rs:
            continue
        first = next(iter(rs.values()))
        row = {"cell": c.name, "label": c.label, "bits": c.bits, "family": c.family, "seeds": sorted(rs),
               "lr": first["lr"], "trainable_params": first["trainable_params"],
               "train_time_s": sum(r["train_time_s"] for r in rs.values()) / len(rs)}
        for key, _, _ in METRICS:
            vals = [r[key] for r in rs.values() if r[key] is not None]
            row[key] = mean_ci(vals) if vals else None
        sets = sorted({k for r in rs.values() for k in r["accuracy"]})
        row["accuracy"] = {s: mean_ci([r["accuracy"][s] for r in rs.values()]) for s in sets}
        row["loss"] = {s: mean_ci([r["loss"][s] for r in rs.values()]) for s in sorted(first["loss"])}
        out_cells.append(row)
    out_pairs = []
    for a_t, b_t, what in pairs:
        for b in (bits if "{b}" in a_t else (None,)):
            a, bb = a_t.format(b=b), b_t.format(b=b)
            if a not in by_cell or bb not in by_cell:
                continue
            row = {"a": a, "b": bb, "what": what, "bits": b}
            for key, _, better in METRICS:
                va = {s: r[key] for s, r in by_cell[a].items() if r[key] is not None}
                vb = {s: r[key] for s, r in by_cell[bb].items() if r[key] is not None}
                if not (set(va) & set(vb)):
                    row[key] = None
                    continue
                ci = paired_ci(va, vb)
                sign = {"a > b": 1, "a < b": -1}.get(ci["verdict"], 0) * (1 if better == "higher" else -1)
                ci["better"] = {1: a, -1: bb, 0: "unresolved"}[sign]
                row[key] = ci
            out_pairs.append(row)
    return {"cells": out_cells, "pairs": out_pairs}


def _ci(ci: dict | None, spec: str) -> str:
    return "–" if ci is None else fmt_ci(ci, spec)


def format_report(results: dict) -> str:
    """The markdown report: the budget, the learning-rate search, the per-cell table and the paired differences."""
    b = results["budget"]
    lines = [f"Budget: {b['steps']} steps x batch {b['batch_size']}; seeds {list(b['seeds'])} (4-bit: "
             f"{list(b['seeds_4bit'])}); {b['n_eval']} test problems per family; learning rates searched "
             f"({b['search_steps']} steps, seed 0) on {b['n_val']} validation records per family. Intervals: 95% "
             f"t over seeds (n=1: no interval).", ""]
    if results.get("learning_rates"):
        lines += ["| adapter family | chosen lr | validation loss per lr |", "|---|---|---|"]
        for key, lr in results["learning_rates"].items():
            fam, prec = key.rsplit("-", 1)
            grid = [s for s in results["search"] if s["family"] == fam and s["quantized"] == (prec == "quantized")]
            lines.append(f"| {fam} ({'quantized' if prec == 'quantized' else 'full precision'}, on "
                         f"{grid[0]['cell'] if grid else '–'}) | {lr:g} | "
                         + ", ".join(f"{s['lr']:g}: {s['val_loss']:.4f}" for s in grid) + " |")
        lines.append("")
    order = ["synthetic-gsm8k", "synthetic-svamp", "synthetic-mawps", "synthetic-aqua"]
    sets = sorted({s for c in results["cells"] for s in c["accuracy"]}, key=lambda s: (s not in order,
                                                                                        order.index(s) if s in order
                                                                                        else 0, s))
    lines += ["| bits | method | trainable | lr | seeds | " + " | ".join(s.removeprefix("synthetic-") for s in sets)
              + " | avg accuracy | response loss |", "|---" * (7 + len(sets)) + "|"]
    for c in results["cells"]:
        lines.append(f"| {c['bits'] or 'fp32'} | {c['label']} | {c['trainable_params']:,} | {c['lr']:g} | "
                     f"{len(c['seeds'])} | " + " | ".join(_ci(c["accuracy"].get(s), ".1f") for s in sets)
                     + f" | {_ci(c['acc_avg'], '.1f')} | {_ci(c['loss_avg'], '.4f')} |")
    lines += ["", "Paired differences (a − b over common seeds; **bold**: the interval excludes zero):", "",
              "| bits | a | b | isolates | Δ accuracy (points) | better | Δ response loss | better |",
              "|---|---|---|---|---|---|---|---|"]
    for p in results["pairs"]:
        cells = []
        for key, spec in (("acc_avg", ".1f"), ("loss_avg", ".4f")):
            ci = p.get(key)
            if ci is None:
                cells += ["–", "–"]
                continue
            txt = _ci(ci, spec)
            cells += [f"**{txt}**" if ci["better"] != "unresolved" else txt, ci["better"]]
        lines.append(f"| {p['bits'] or 'fp32'} | {p['a']} | {p['b']} | {p['what']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_study(results: dict, path: str | Path) -> Path:
    """Two panels (average accuracy, response loss), one bar per cell with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_write_figure

    cells = results["cells"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.38 * len(cells) + 1.6), sharey=True)
    ys = list(range(len(cells)))[::-1]
    colors = {None: "tab:gray", 2: "tab:red", 3: "tab:orange", 4: "tab:blue"}
    for ax, (key, title, _) in zip(axes, (("acc_avg", "average accuracy (%)", 0), ("loss_avg", "response loss", 0))):
        for y, c in zip(ys, cells):
            ci = c[key]
            if ci is None:
                continue
            ax.barh(y, ci["mean"], xerr=ci["half"] or 0, color=colors.get(c["bits"], "tab:green"), alpha=0.8,
                    capsize=3)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ys, [f"{c['bits'] or 'fp'}: {c['label']} (n={len(c['seeds'])})" for c in cells], fontsize=8)
    fig.suptitle("lowbit study on the tiny model: mean over seeds, 95% t intervals")
    fig.tight_layout()
    return atomic_write_figure(path, fig)


def write_report(out: Path, results: dict, echo: bool = True) -> None:
    from ..io import atomic_write_json, atomic_write_text

    atomic_write_json(out / "results.json", results)
    report = format_report(results)
    atomic_write_text(out / "study.md", report)
    if results["cells"]:
        plot_study(results, out / "study.png")
    if echo:
        print(report)
