"""``lowbit demo --real``: the ``smollm2-*`` recipes on SmolLM2-135M, each scored before and after fine-tuning.

1. Quantized bases, built once per distinct recipe ``quant`` section (``lowbit quantize`` with the recipe's
   calibration) and cached under ``OUT/bases``; LoftQ and ApiQ-bw quantize their own base inside the run.
2. One fine-tuning run per recipe (2 bits: QLoRA, GPTQ-LoRA, LoftQ, ApiQ-bw, CLoQ, DiaBlo (MagR), calibrated DiaBlo;
   4 bits: GPTQ-LoRA, CLoQ, DiaBlo; full precision: LoRA, DiaBlo), evaluated by the recipe's ``eval`` section
   (held-out response loss and accuracy on the real GSM8K, SVAMP, MAWPS and AQuA test files).
3. "Before": the same evaluation of the base each adapter was trained on, without the adapter (the float model for
   the full-precision runs; for LoftQ and ApiQ-bw their own quantized base, ``RUN/base``).
4. ``OUT/results.json``, ``OUT/comparison.md`` (printed) and ``OUT/comparison.png`` (response loss before/after).

Everything is cached and resumable: bases by settings, runs by a stamp of their recipe and overrides (as in
``lowbit demo``), evaluations by ``lowbit evaluate``'s own per-example rows. One run per method and one seed:
orderings in the table are measurements of this run, not verdicts.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..io import atomic_write_figure, atomic_write_json, atomic_write_text, read_json
from .demo import base_dir, base_settings, cached_run

log = logging.getLogger(__name__)

# (recipe key, label); which recipes share a cached base: those whose init leaves the quantized weights as they are.
METHODS = {"lora-fp": "LoRA", "diablo-fp": "DiaBlo", "qlora": "QLoRA", "gptq-lora": "GPTQ-LoRA", "loftq": "LoftQ",
           "apiq-bw": "ApiQ-bw", "cloq": "CLoQ",
           "diablo": "DiaBlo (MagR)", "diablo-calibrated": "DiaBlo calibrated (MagR)"}
OWN_BASE = {"loftq", "apiq-bw"}
RUNS_2BIT = [k for k in METHODS if not k.endswith("-fp")]
RUNS_4BIT = ["gptq-lora", "cloq", "diablo"]
QUICK_RUNS = [("2bit-gptq-lora", "gptq-lora", 2), ("2bit-diablo", "diablo", 2)]


@dataclass
class SuiteBudget:
    """Overrides applied to every recipe (``None``: the recipe's own value)."""

    steps: int | None = None
    eval_limit: int | None = None
    loss_limit: int | None = None
    max_new_tokens: int | None = None
    calib_samples: int | None = None
    magr_iters: int | None = None
    accuracy: bool = True

    def overrides(self, quantized: bool) -> list[str]:
        out = ["eval.response_loss=true"]  # the suite's main measure, whatever the recipe says
        if not self.accuracy:
            out.append("eval.accuracy=false")
        if self.steps is not None:
            out += [f"train.max_steps={self.steps}", f"train.save_steps={self.steps}"]
        for key, v in (("eval.limit", self.eval_limit), ("eval.loss_limit", self.loss_limit),
                       ("eval.max_new_tokens", self.max_new_tokens), ("calibration.nsamples", self.calib_samples)):
            if v is not None:
                out.append(f"{key}={v}")
        if quantized and self.magr_iters is not None:
            out.append(f"quant.magr_iters={self.magr_iters}")
        return out


QUICK_BUDGET = SuiteBudget(steps=2, eval_limit=2, loss_limit=4, max_new_tokens=16, calib_samples=4, magr_iters=5)


def suite_runs(quick: bool) -> list[tuple[str, str, int | None]]:
    """(run name, recipe key, bits) in table order."""
    if quick:
        return list(QUICK_RUNS)
    # The 2-bit methods first: the comparison the suite exists for (a run cut short keeps the most useful rows).
    runs: list[tuple[str, str, int | None]] = [("fp-lora", "lora-fp", None)]
    runs += [(f"2bit-{k}", k, 2) for k in RUNS_2BIT]
    runs += [(f"4bit-{k}", k, 4) for k in RUNS_4BIT]
    return runs + [("fp-diablo", "diablo-fp", None)]


STAMP = "demo_stamp.json"


def trained(run_dir: Path, stamp: dict) -> bool:
    """A finished training run with the same settings (its evaluation may still be partial); a damaged stamp or
    ``run.json`` counts as not trained (it trains again)."""
    return cached_run(run_dir, stamp, need_summary=False)


def _recipe(prefix: str, key: str, bits: int | None) -> str:
    return f"{prefix}-{key}" if bits is None else f"{prefix}-{key}-{bits}bit"


def build_base(out: Path, cfg) -> Path:
    """The recipe's quantized base in ``OUT/bases/<method>-<bits>bit`` (rebuilt when its settings differ)."""
    from .quantize import QuantizeRun, run_quantize

    d = base_dir(out, cfg.quant)
    if base_settings(d) == cfg.quant.to_dict():
        return d
    if d.exists():
        shutil.rmtree(d)
    log.info("base %s %d-bit -> %s", cfg.quant.method, cfg.quant.bits, d)
    run_quantize(QuantizeRun(model=cfg.model.name, out=str(d), quant=cfg.quant, calibration=cfg.calibration,
                             ppl_windows=0))
    return d


def _evaluate_before(out: Path, label: str, model: str, eval_cfg) -> dict:
    from .evaluate import EvaluateRun, run_evaluation

    return run_evaluation(EvaluateRun(model=model, eval=eval_cfg, out=str(out / "before" / label), progress=False))


def run_suite(out_dir: str | Path = "real_out", quick: bool = False, budget: SuiteBudget | None = None,
              prefix: str = "smollm2") -> dict:
    """Run (or reuse) every run and its "before" evaluation; print and write the table. Returns ``results.json``'s
    content. ``prefix``: the recipe family (``smollm2``; tests use ``tiny``)."""
    from .config import load_recipe
    from .finetune import evaluate_run, finetune

    out = Path(out_dir)
    budget = budget or (QUICK_BUDGET if quick else SuiteBudget())
    t_start = time.perf_counter()
    plans = []
    for name, key, bits in suite_runs(quick):
        recipe = _recipe(prefix, key, bits)
        overrides = [*budget.overrides(quantized=bits is not None), f"output_dir={out / 'runs' / name}"]
        plans.append((name, key, bits, recipe, overrides, load_recipe(recipe, overrides)))  # all checked up front
    rows = []
    for i, (name, key, bits, recipe, overrides, cfg) in enumerate(plans):
        run_dir = out / "runs" / name
        stamp = {"recipe": recipe, "overrides": overrides, "base": None}
        if bits is not None and key not in OWN_BASE:
            d = build_base(out, cfg)
            overrides = [*overrides, f"model.quantized={d.resolve()}"]
            stamp = {"recipe": recipe, "overrides": overrides, "base": base_settings(d)}
        if trained(run_dir, stamp):
            log.info("[%d/%d] %s: trained (cached)", i + 1, len(plans), name)
        else:
            log.info("[%d/%d] %s: %s", i + 1, len(plans), name, recipe)
            if run_dir.exists():
                shutil.rmtree(run_dir)  # a stale or half-finished run of other settings
            finetune(load_recipe(recipe, [*overrides, "eval=null"]))  # evaluated below, resumably
            atomic_write_json(run_dir / STAMP, stamp, seal=True)
        run = read_json(run_dir / "run.json", f"delete {run_dir} and run the suite again")
        after = evaluate_run(cfg, run_dir, run["base"])  # rows already generated are reused
        base_label = "fp" if bits is None else (name if key in OWN_BASE else f"{cfg.quant.method}-{bits}bit")
        before = _evaluate_before(out, base_label, run["base"], cfg.eval)
        rows.append({"run": name, "method": METHODS[key], "bits": bits or 16,
                     "base": base_label, "trainable_params": run["trainable_params"], "steps": run["steps"],
                     "train_time_s": run["train_time_s"], "init_time_s": run["init_time_s"],
                     "before": _scores(before), "after": _scores(after)})
        atomic_write_json(out / "results.json", {"rows": rows, "partial": True})  # a killed suite keeps its rows
    results = {"rows": rows, "budget": budget.__dict__, "quick": quick, "prefix": prefix,
               "seconds": time.perf_counter() - t_start}
    table = format_table(rows)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "comparison.md", table + "\n")
    plot_losses(rows, out / "comparison.png")
    print(table)
    print(f"\n({results['seconds']:.0f}s; results in {out})")
    return results


def _scores(summary: dict) -> dict:
    """``{set: {"loss": response loss or None, "acc": accuracy}}`` from an evaluation summary."""
    out = {}
    for name, d in summary["datasets"].items():
        out[name] = {"loss": (d.get("response_loss") or {}).get("loss"), "acc": d.get("accuracy")}
    return out


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def format_table(rows: list[dict]) -> str:
    """Markdown: per set, response loss before → after and accuracy before → after; whether the loss fell on all."""
    sets = list(rows[0]["after"]) if rows else []
    head = ["run", "bits", "trainable", "train (s)"] + [f"{s} loss" for s in sets] + [f"{s} acc %" for s in sets]
    lines = ["| " + " | ".join(head + ["loss lower on all"]) + " |", "|" + "---|" * (len(head) + 1)]
    for r in rows:
        b, a = r["before"], r["after"]
        loss = [f"{_fmt(b[s]['loss'], '.3f')} → {_fmt(a[s]['loss'], '.3f')}" for s in sets]
        acc = [f"{_fmt(b[s]['acc'], '.0f')} → {_fmt(a[s]['acc'], '.0f')}" for s in sets]
        lower = all(a[s]["loss"] is not None and b[s]["loss"] is not None and a[s]["loss"] < b[s]["loss"]
                    for s in sets)
        lines.append("| " + " | ".join([f"{r['method']} ({r['run']})", str(r["bits"]), f"{r['trainable_params']:,}",
                                         f"{r['train_time_s']:.0f}", *loss, *acc, "yes" if lower else "no"]) + " |")
    return "\n".join(lines)


def plot_losses(rows: list[dict], path: str | Path) -> Path:
    """One horizontal panel per test set: each run's response loss before (light) and after (dark) fine-tuning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(rows[0]["after"]) if rows else []
    fig, axes = plt.subplots(1, max(len(sets), 1), sharey=True, figsize=(3.0 * max(len(sets), 1) + 2.5,
                                                                         0.45 * len(rows) + 1.2), squeeze=False)
    ys = list(range(len(rows)))[::-1]
    for ax, s in zip(axes[0], sets):
        before = [r["before"][s]["loss"] or 0.0 for r in rows]
        after = [r["after"][s]["loss"] or 0.0 for r in rows]
        ax.barh([y + 0.2 for y in ys], before, height=0.4, color="#c9c9c9", label="before")
        ax.barh([y - 0.2 for y in ys], after, height=0.4, color="#4c72b0", label="after")
        ax.set_title(s, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(ys, [f"{r['method']} ({r['bits']}-bit)" for r in rows], fontsize=8)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.supxlabel("held-out response loss (nats/token, lower is better)", fontsize=9)
    fig.tight_layout()
    return atomic_write_figure(path, fig)
