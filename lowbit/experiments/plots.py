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
    """Two panels (accuracy, response loss), one bar per cell with its 95% interval over seeds and problems."""
    plt = _pyplot()
    cells = results["cells"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.38 * len(cells) + 1.6), sharey=True)
    ys = list(range(len(cells)))[::-1]
    colors = {None: "tab:gray", 2: "tab:red", 3: "tab:orange", 4: "tab:blue"}
    for ax, (key, title) in zip(axes, (("accuracy", "accuracy (%)"), ("response_loss", "response loss"))):
        for y, c in zip(ys, cells):
            if c[key] is not None:
                ax.barh(y, c[key]["mean"], xerr=c[key].get("half") or 0, color=colors.get(c["bits"], "tab:green"),
                        alpha=0.8, capsize=3)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ys, [f"{c['bits'] or 'fp'}: {c['label']} (n={len(c['seeds'])})" for c in cells], fontsize=8)
    fig.suptitle(f"{results['name']}: mean over seeds and test problems, 95% intervals (crossed)")
    fig.tight_layout()
    return atomic_write_figure(path, fig)


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def before_after_table(runs: list[dict]) -> str:
    """Per run and set: response loss and accuracy of the bare base → (the adapter as initialised, for an init that
    changes the model) → after fine-tuning; whether fine-tuning lowered the loss below its starting point (the
    initialised adapter where there is one, else the bare base) on every set."""
    sets = list(runs[0]["loss"] or runs[0]["accuracy"])
    head = ["run", "trainable", "train (s)"] + [f"{s} loss" for s in sets] + [f"{s} acc %" for s in sets]
    lines = ["| " + " | ".join(head + ["loss lower on all"]) + " |", "|" + "---|" * (len(head) + 1)]
    for r in runs:
        b, i = r["before"], r["before"].get("initialised")
        steps = [b, i, r] if i else [b, r]
        loss = [" → ".join(_fmt(x["loss"].get(s), ".3f") for x in steps) for s in sets]
        acc = [" → ".join(_fmt(x["accuracy"].get(s), ".0f") for x in steps) for s in sets]
        start = i or b
        lower = all(start["loss"].get(s) is not None and r["loss"].get(s) is not None
                    and r["loss"][s] < start["loss"][s] for s in sets)
        lines.append("| " + " | ".join([f"{r['method']} ({r['run']})", f"{r['trainable_params']:,}",
                                         f"{r['train_time_s']:.0f}", *loss, *acc, "yes" if lower else "no"]) + " |")
    return "\n".join(lines) + "\n\nbase → initialised adapter (where the init changes the model) → after fine-tuning."


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
