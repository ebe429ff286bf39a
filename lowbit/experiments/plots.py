"""The experiment report's charts and the before → after table (runs scored with and without their adapter)."""

from __future__ import annotations

from pathlib import Path

from ..io import atomic_write_figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cells(results: dict, path: str | Path) -> Path:
    """Two panels (average accuracy, response loss), one bar per cell with its 95% interval over seeds."""
    plt = _pyplot()
    cells = results["cells"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.38 * len(cells) + 1.6), sharey=True)
    ys = list(range(len(cells)))[::-1]
    colors = {None: "tab:gray", 2: "tab:red", 3: "tab:orange", 4: "tab:blue"}
    for ax, (key, title) in zip(axes, (("acc_avg", "average accuracy (%)"), ("loss_avg", "response loss"))):
        for y, c in zip(ys, cells):
            if c[key] is not None:
                ax.barh(y, c[key]["mean"], xerr=c[key]["half"] or 0, color=colors.get(c["bits"], "tab:green"),
                        alpha=0.8, capsize=3)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ys, [f"{c['bits'] or 'fp'}: {c['label']} (n={len(c['seeds'])})" for c in cells], fontsize=8)
    fig.suptitle(f"{results['name']}: mean over seeds, 95% t intervals")
    fig.tight_layout()
    return atomic_write_figure(path, fig)


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def before_after_table(runs: list[dict]) -> str:
    """Per run and set: response loss and accuracy before → after fine-tuning; whether the loss fell on every set."""
    sets = list(runs[0]["loss"] or runs[0]["accuracy"])
    head = ["run", "trainable", "train (s)"] + [f"{s} loss" for s in sets] + [f"{s} acc %" for s in sets]
    lines = ["| " + " | ".join(head + ["loss lower on all"]) + " |", "|" + "---|" * (len(head) + 1)]
    for r in runs:
        b = r["before"]
        loss = [f"{_fmt(b['loss'].get(s), '.3f')} → {_fmt(r['loss'].get(s), '.3f')}" for s in sets]
        acc = [f"{_fmt(b['accuracy'].get(s), '.0f')} → {_fmt(r['accuracy'].get(s), '.0f')}" for s in sets]
        lower = all(b["loss"].get(s) is not None and r["loss"].get(s) is not None and r["loss"][s] < b["loss"][s]
                    for s in sets)
        lines.append("| " + " | ".join([f"{r['method']} ({r['run']})", f"{r['trainable_params']:,}",
                                         f"{r['train_time_s']:.0f}", *loss, *acc, "yes" if lower else "no"]) + " |")
    return "\n".join(lines)


def plot_before_after(runs: list[dict], path: str | Path) -> Path:
    """One panel per test set: each run's response loss before (light) and after (dark) fine-tuning."""
    plt = _pyplot()
    sets = list(runs[0]["loss"])
    fig, axes = plt.subplots(1, max(len(sets), 1), sharey=True, squeeze=False,
                             figsize=(3.0 * max(len(sets), 1) + 2.5, 0.45 * len(runs) + 1.2))
    ys = list(range(len(runs)))[::-1]
    for ax, s in zip(axes[0], sets):
        ax.barh([y + 0.2 for y in ys], [r["before"]["loss"].get(s) or 0.0 for r in runs], height=0.4,
                color="#c9c9c9", label="before")
        ax.barh([y - 0.2 for y in ys], [r["loss"].get(s) or 0.0 for r in runs], height=0.4, color="#4c72b0",
                label="after")
        ax.set_title(s, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(ys, [f"{r['method']} ({r['run']})" for r in runs], fontsize=8)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.supxlabel("held-out response loss (nats/token, lower is better)", fontsize=9)
    fig.tight_layout()
    return atomic_write_figure(path, fig)
