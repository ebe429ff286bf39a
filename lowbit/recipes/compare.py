"""``lowbit compare RUN_DIR ...``: the paper's quantized-table layout (bits, method, trainable parameters, per-set
accuracy, average, peak memory, train time) as markdown, and a grouped bar chart of the accuracies.

A run directory holds the ``summary.json`` of ``lowbit evaluate --out RUN_DIR`` and, optionally, what fine-tuning
wrote next to it: ``run.json`` and/or ``config.yaml`` (``run.json`` wins where both give a key), read for the
top-level keys ``bits``, ``method``, ``trainable_params`` (an integer count), ``peak_memory_gb`` and
``train_time_s``. ``bits`` falls back to the evaluated model's (quantized bits, else 16/32 from its dtype).

A plain ``lowbit evaluate --model BASE --adapter ADAPTER --out DIR`` has neither file: its other keys come from the
adapter (:func:`adapter_keys`): the fine-tuning run's ``run.json`` beside it (``RUN/adapter``), else the adapter's
own files (the method from ``lowbit_adapter.json`` or PEFT's ``adapter_config.json``, the trainable parameters
counted in ``adapter_model.safetensors``). A model evaluated without an adapter is its quantization method
("gptq, no adapter") or "full precision", with no trainable parameters to show. A key found nowhere shows as "–".
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from ..data.testsets import display_name, known_datasets
from ..io import atomic_write_figure, atomic_write_text, read_json

log = logging.getLogger(__name__)

RUN_KEYS = ("bits", "method", "trainable_params", "peak_memory_gb", "train_time_s")
DASH = "–"


def load_run(path: str | Path) -> dict:
    """A run directory (or its ``summary.json``) -> ``{"name", "dir", "summary", **RUN_KEYS}``."""
    p = Path(path)
    summary_path = p if p.is_file() else p / "summary.json"
    if not summary_path.is_file():
        raise ValueError(f"{str(path)!r} holds no summary.json; evaluate the run first with "
                         f"`lowbit evaluate --model ... --out {path}`")
    summary = read_json(summary_path, f"re-run `lowbit evaluate --out {p}`")
    if not isinstance(summary, dict) or not isinstance(summary.get("datasets"), dict):
        raise ValueError(f"{summary_path} is not a `lowbit evaluate` summary (no 'datasets' entry)")
    run_dir = summary_path.parent
    meta: dict = {}
    if (run_dir / "config.yaml").is_file():
        import yaml

        try:
            cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ValueError(f"{run_dir / 'config.yaml'} is corrupt ({type(e).__name__}); restore it or delete it "
                             f"(it only names the run's settings here)") from None
        meta.update({k: cfg[k] for k in RUN_KEYS if isinstance(cfg, dict) and cfg.get(k) is not None})
    if (run_dir / "run.json").is_file():
        info = read_json(run_dir / "run.json", "re-run the fine-tuning that wrote it, or delete it")
        meta.update({k: info[k] for k in RUN_KEYS if isinstance(info, dict) and info.get(k) is not None})
    meta.setdefault("bits", summary.get("bits"))
    for k, v in adapter_keys(summary).items():
        meta.setdefault(k, v)
    if not summary.get("complete", True):
        log.warning("%s: the evaluation did not finish; its numbers cover only the sets done", summary_path)
    return {"name": run_dir.resolve().name, "dir": str(run_dir), "summary": summary,
            **{k: meta.get(k) for k in RUN_KEYS}}


def adapter_keys(summary: dict) -> dict:
    """The run keys (no ``bits``: the evaluated model's) an evaluation summary's adapter gives; ``{}`` where none is
    known (the adapter directory gone or damaged: logged)."""
    adapter = summary.get("adapter")
    if not adapter:
        q = summary.get("quantization") or {}
        return {"method": f"{q['method']}, no adapter" if summary.get("quantized") and q.get("method")
                else "full precision"}
    d = Path(adapter)
    try:
        beside = d.parent / "run.json"
        if d.name == "adapter" and beside.is_file():  # the fine-tuning run that wrote the adapter
            info = read_json(beside, "re-run the fine-tuning that wrote it, or delete it")
            if isinstance(info, dict):
                return {k: info[k] for k in RUN_KEYS if k != "bits" and info.get(k) is not None}
        return {"method": _adapter_method(d), "trainable_params": _stored_numel(d / "adapter_model.safetensors")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("adapter %s: %s; its method and trainable parameters show as %s", d, e, DASH)
        return {}


def _adapter_method(d: Path) -> str:
    """``lora-cloq`` from ``lowbit_adapter.json`` (as fine-tuning names a recipe without a ``method``), else
    ``LORA (PEFT)`` from PEFT's ``adapter_config.json``."""
    if (d / "lowbit_adapter.json").is_file():
        a = read_json(d / "lowbit_adapter.json")["adapter"]
        return f"{a['adapter']}-{a.get('init', 'default')}"
    return f"{read_json(d / 'adapter_config.json')['peft_type']} (PEFT)"


def _stored_numel(path: Path) -> int:
    """Entries of every tensor in a safetensors file, read from its header alone (an adapter file holds exactly
    its trainable tensors)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= path.stat().st_size - 8:
            raise ValueError(f"{path} is truncated or corrupt (header length {n})")
        header = json.loads(f.read(n))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def _columns(runs: list[dict]) -> list[str]:
    names = {n for r in runs for n in r["summary"]["datasets"]}
    order = known_datasets()
    return [n for n in order if n in names] + sorted(names - set(order))


def _acc(run: dict, name: str) -> float | None:
    d = run["summary"]["datasets"].get(name)
    return None if d is None else d["accuracy"]


def _avg(run: dict, cols: list[str]) -> float | None:
    """Mean over the table's columns; "–" when the run lacks one of them (averages over other sets mislead)."""
    accs = [_acc(run, c) for c in cols]
    return None if not accs or any(a is None for a in accs) else sum(accs) / len(accs)


def _fmt_count(n) -> str:
    if n is None:
        return DASH
    if isinstance(n, str):
        return n
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _fmt_time(s) -> str:
    if s is None:
        return DASH
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _fmt(v, spec: str = ".1f") -> str:
    return DASH if v is None else format(v, spec)


def _loss(run: dict, name: str) -> float | None:
    d = run["summary"]["datasets"].get(name) or {}
    return (d.get("response_loss") or {}).get("loss")


def compare_table(runs: list[dict]) -> str:
    """Markdown: one row per run; accuracy columns in the paper's order (GSM8K, SVAMP, MAWPS, AQuA, ...); when some
    run scored the held-out response loss, one loss column per set that has it (lower is better)."""
    cols = _columns(runs)
    loss_cols = [c for c in cols if any(_loss(r, c) is not None for r in runs)]
    head = ["bits", "method", "trainable"] + [display_name(c) for c in cols] + ["avg"]
    head += [f"{display_name(c)} loss" for c in loss_cols] + ["peak mem (GB)", "train time", "run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in runs:
        cells = [_fmt(r["bits"], ""), _fmt(r["method"], ""), _fmt_count(r["trainable_params"])]
        cells += [_fmt(_acc(r, c)) for c in cols] + [_fmt(_avg(r, cols))] + [_fmt(_loss(r, c), ".4f")
                                                                            for c in loss_cols]
        cells += [_fmt(r["peak_memory_gb"], ".1f"), _fmt_time(r["train_time_s"]), r["name"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _label(run: dict) -> str:
    parts = [f"{run['bits']}-bit" if run["bits"] is not None else None, run["method"]]
    desc = " ".join(str(p) for p in parts if p)
    return f"{run['name']} ({desc})" if desc else run["name"]


def plot_runs(runs: list[dict], path: str | Path) -> Path:
    """One horizontal bar panel per set plus "avg" (one bar per run, in table order, coloured by bit width, value
    printed), written atomically as PNG. Readable with a dozen or more runs, unlike one grouped bar chart."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    cols = _columns(runs)
    groups = [display_name(c) for c in cols] + ["avg"]
    labels = [_label(r) for r in runs]
    palette = {16: "#4c72b0", 32: "#4c72b0", 8: "#64b5cd", 4: "#55a868", 3: "#ccb974", 2: "#c44e52"}
    colors = [palette.get(r.get("bits"), "#8172b2") for r in runs]
    fig, axes = plt.subplots(1, len(groups), sharey=True,
                             figsize=(2.4 * len(groups) + 2.5, 0.32 * len(runs) + 1.2), squeeze=False)
    ys = list(range(len(runs)))[::-1]  # first run on top
    for j, (ax, title) in enumerate(zip(axes[0], groups)):
        vals = [_acc(r, cols[j]) if j < len(cols) else _avg(r, cols) for r in runs]
        ax.barh(ys, [0.0 if v is None else v for v in vals], color=colors, height=0.75)
        for y, v in zip(ys, vals):
            ax.text((v or 0.0) + 1.5, y, "n/a" if v is None else f"{v:.1f}", va="center", fontsize=7)
        ax.set_xlim(0, 100)
        ax.set_title(title, fontsize=10, fontweight="bold" if title == "avg" else "normal")
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
    axes[0][0].set_yticks(ys, labels, fontsize=8)
    fig.supxlabel("accuracy (%)", fontsize=9)
    fig.tight_layout()
    return atomic_write_figure(path, fig)


def compare_runs(run_dirs: list[str | Path], out: str | Path, plot: bool = True) -> tuple[str, Path | None]:
    """Load the runs, write ``OUT/compare.md`` (and ``OUT/compare.png``) -> (the table, the chart path or None).
    Raises ``ValueError`` naming a run without a summary, or an ``out`` that is a file."""
    runs = [load_run(r) for r in run_dirs]
    names = [r["name"] for r in runs]
    for r in runs:  # two runs both called "eval": name them by their parent too
        if names.count(r["name"]) > 1:
            r["name"] = f"{Path(r['dir']).resolve().parent.name}/{r['name']}"
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("the bar chart needs matplotlib; `pip install matplotlib`, or pass --no-plot") from None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a directory for compare.md and compare.png")
    table = compare_table(runs)
    atomic_write_text(out / "compare.md", table + "\n")
    return table, plot_runs(runs, out / "compare.png") if plot else None
