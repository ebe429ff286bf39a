"""``lowbit study``: the comparison that resolves, on the embedded tiny model.

1. Bases, built once per distinct recipe ``quant`` section (NF, GPTQ, MagR+GPTQ at 2 and 4 bits) and shared.
2. Learning rates: per adapter family (LoRA, DiaBlo) and precision (full precision, quantized), each grid value
   trains ``search_steps`` steps (seed 0) and is scored by the held-out response loss on the **validation**
   splits (``synthetic-<family>-val``: the training distribution, disjoint from the test and training sets); the
   lowest loss wins. Test records are never read for tuning.
3. Every cell (a method on a base: the paper's base and the matched pairs on one shared base) trains at its
   family's rate for each seed; the seed fixes the data order and the adapter initialisation stream, the same for
   every method (paired). Each run is scored on the synthetic test sets: accuracy and held-out response loss.
4. Per cell the mean ± 95% t interval over seeds; per matched pair the paired difference and its interval
   (:mod:`lowbit.eval.stats`). Written to ``OUT/results.json``, ``OUT/study.md``, ``OUT/study.png``.

Resumable: each finished run (search or final) is one sealed ledger file ``OUT/ledger/<run>.json`` holding its
settings stamp and scores; a second ``lowbit study`` skips every run whose ledger entry has the same stamp, and a
run killed half-way starts again from scratch. ``OUT/runs`` is scratch (adapters, generations) and may be deleted.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io import atomic_write_json
from .demo import base_dir, base_settings, build_bases, model_fingerprint, read_cache, train_fresh

log = logging.getLogger(__name__)

FAMILIES = ("gsm8k", "svamp", "mawps", "aqua")
TEST_SETS = [f"synthetic-{f}" for f in FAMILIES]
VAL_SETS = [f"synthetic-{f}-val" for f in FAMILIES]


@dataclass(frozen=True)
class Cell:
    """One method on one base: ``recipe`` plus ``overrides``; ``family`` picks the learning rate (``lora`` or
    ``diablo``); ``shared``: trains on a cached base (``False``: full precision, or an init that quantizes the base
    itself: LoftQ, ApiQ-bw)."""

    name: str
    label: str
    recipe: str
    bits: int | None
    family: str
    shared: bool = True
    overrides: tuple[str, ...] = ()


def study_cells(bits: tuple[int, ...] = (2, 4)) -> list[Cell]:
    """Full precision (LoRA r=16, DiaBlo N=16, and LoRA r=10: DiaBlo N=16's parameter count within 3%), then per
    bit width the paper's pairings and the matched ones (CLoQ and GPTQ-LoRA on both GPTQ and MagR+GPTQ)."""
    cells = [Cell("fp-lora", "LoRA r=16", "tiny-lora-fp", None, "lora", False),
             Cell("fp-diablo", "DiaBlo N=16", "tiny-diablo-fp", None, "diablo", False),
             Cell("fp-lora-r10", "LoRA r=10 (= DiaBlo N=16 params)", "tiny-lora-fp", None, "lora", False,
                  ("adapter.rank=10", "adapter.alpha=20"))]
    for b in bits:
        cells += [
            Cell(f"{b}bit-qlora", "QLoRA (NF)", f"tiny-qlora-{b}bit", b, "lora"),
            Cell(f"{b}bit-loftq", "LoftQ (NF)", f"tiny-loftq-{b}bit", b, "lora", False),
            Cell(f"{b}bit-apiq-bw", "ApiQ-bw (RTN grid, learned clipping)", f"tiny-apiq-bw-{b}bit", b, "lora", False),
            Cell(f"{b}bit-gptq-lora", "GPTQ-LoRA (GPTQ)", f"tiny-gptq-lora-{b}bit", b, "lora"),
            Cell(f"{b}bit-cloq-gptq", "CLoQ (GPTQ)", f"tiny-cloq-{b}bit", b, "lora", True, ("quant.method=gptq",)),
            Cell(f"{b}bit-gptq-lora-magr", "GPTQ-LoRA (MagR)", f"tiny-gptq-lora-{b}bit", b, "lora", True,
                 ("quant.method=magr-gptq",)),
            Cell(f"{b}bit-cloq", "CLoQ (MagR)", f"tiny-cloq-{b}bit", b, "lora"),
            Cell(f"{b}bit-diablo", "DiaBlo (MagR)", f"tiny-diablo-{b}bit", b, "diablo"),
            Cell(f"{b}bit-diablo-calibrated", "DiaBlo calibrated (MagR)", f"tiny-diablo-calibrated-{b}bit", b,
                 "diablo"),
        ]
    return cells


# (a, b, what it isolates): a - b with a CI; both on the same base unless said.
PAIRS = [
    ("fp-diablo", "fp-lora-r10", "DiaBlo vs LoRA at equal trainable parameters (full precision)"),
    ("fp-diablo", "fp-lora", "DiaBlo N=16 vs LoRA r=16, the paper's unequal counts (full precision)"),
    ("{b}bit-cloq-gptq", "{b}bit-gptq-lora", "CLoQ vs zero-init LoRA, same GPTQ base"),
    ("{b}bit-cloq", "{b}bit-gptq-lora-magr", "CLoQ vs zero-init LoRA, same MagR+GPTQ base"),
    ("{b}bit-diablo-calibrated", "{b}bit-diablo", "calibrated vs zero-init DiaBlo, same MagR+GPTQ base"),
    ("{b}bit-loftq", "{b}bit-qlora", "LoftQ vs QLoRA (NF; LoftQ re-quantizes)"),
    ("{b}bit-diablo", "{b}bit-cloq", "DiaBlo vs CLoQ, same MagR+GPTQ base"),
    ("{b}bit-gptq-lora-magr", "{b}bit-gptq-lora", "MagR+GPTQ vs GPTQ base, zero-init LoRA"),
    ("{b}bit-cloq", "{b}bit-cloq-gptq", "MagR+GPTQ vs GPTQ base, CLoQ"),
    ("{b}bit-diablo", "{b}bit-apiq-bw", "paper order: DiaBlo >= ApiQ-bw"),
    ("{b}bit-apiq-bw", "{b}bit-loftq", "paper order: ApiQ-bw >= LoftQ"),
    ("{b}bit-loftq", "{b}bit-gptq-lora", "paper order: LoftQ >= GPTQ-LoRA"),
    ("{b}bit-gptq-lora", "{b}bit-qlora", "paper order: GPTQ-LoRA >> QLoRA"),
]


@dataclass
class StudyBudget:
    """The study's size. ``seeds`` for full precision and the 2-bit arm, ``seeds_4bit`` for the 4-bit arm;
    ``lr_grid`` per adapter family (4 values spanning 10x); ``search_steps`` per grid value; ``n_val``
    validation records per family for the search; ``n_eval`` test problems per family (accuracy and loss)."""

    steps: int = 100
    batch_size: int = 16
    num_examples: int = 2400  # the training pool every run draws its steps x batch examples from
    seeds: tuple[int, ...] = (0, 1, 2)
    seeds_4bit: tuple[int, ...] = (0,)
    bits: tuple[int, ...] = (2, 4)
    lr_grid: dict = field(default_factory=lambda: {"lora": (1e-3, 2e-3, 5e-3, 1e-2),
                                                   "diablo": (5e-3, 1e-2, 2e-2, 5e-2)})
    search_steps: int = 60
    n_val: int = 100
    n_eval: int = 100
    max_new_tokens: int = 96
    cells: tuple[str, ...] | None = None  # a subset of cell names (None: all)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "num_examples", "search_steps", "n_val", "n_eval", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"study budget: {name} must be >= 1, got {getattr(self, name)}")
        if not self.seeds:
            raise ValueError("study budget: seeds is empty; give at least one seed, e.g. seeds=(0, 1, 2)")
        bad = set(self.bits) - {2, 3, 4}
        if bad:
            raise ValueError(f"study budget: bits {sorted(bad)} have no tiny recipes; choose from 2, 3, 4")
        for fam in ("lora", "diablo"):
            if not self.lr_grid.get(fam):
                raise ValueError(f"study budget: lr_grid has no values for {fam!r}")
        known = {c.name for c in study_cells(self.bits)}
        if self.cells is not None and not set(self.cells) <= known:
            raise ValueError(f"study budget: unknown cells {sorted(set(self.cells) - known)}; choose from "
                             f"{', '.join(sorted(known))}")

    def seeds_of(self, cell: Cell) -> tuple[int, ...]:
        return self.seeds_4bit if cell.bits == 4 else self.seeds

    def common(self) -> list[str]:
        """Overrides of every run: the same training pool of ``num_examples`` records (each run draws its
        ``steps x batch`` examples from it in its seed's order) and the same evaluation protocol."""
        return [f"data.num_examples={self.num_examples}", f"train.batch_size={self.batch_size}",
                "train.logging_steps=10", "eval.response_loss=true", f"eval.max_new_tokens={self.max_new_tokens}"]


QUICK_STUDY = StudyBudget(steps=3, batch_size=4, num_examples=12, seeds=(0, 1), seeds_4bit=(0,), bits=(2,),
                          lr_grid={"lora": (2e-3, 1e-2), "diablo": (5e-3, 2e-2)}, search_steps=2, n_val=4,
                          n_eval=4, max_new_tokens=16,
                          cells=("fp-lora", "fp-diablo", "2bit-gptq-lora", "2bit-cloq-gptq"))


def _search_cell(cells: list[Cell], family: str, quantized: bool) -> Cell | None:
    """The cell a family's rate is searched on: full precision, or the zero-initialised 2-bit one (else the lowest
    bit width present)."""
    pool = [c for c in cells if c.family == family and (c.bits is not None) == quantized and not c.overrides]
    zero = [c for c in pool if c.name.endswith(("gptq-lora", "bit-diablo", "fp-lora", "fp-diablo"))]
    pool = sorted(zero or pool, key=lambda c: c.bits or 0)
    return pool[0] if pool else None


def run_study(out_dir: str | Path = "study_out", budget: StudyBudget | None = None, quick: bool = False) -> dict:
    """Run (or resume) the study; write ``results.json``, ``study.md`` and ``study.png``; return the results."""
    from .config import load_recipe
    from .study_report import summarize, write_report

    budget = budget or (QUICK_STUDY if quick else StudyBudget())
    out = Path(out_dir)
    cells = [c for c in study_cells(budget.bits) if budget.cells is None or c.name in budget.cells]
    t0 = time.perf_counter()
    fingerprint = model_fingerprint()
    # Load every recipe first: a bad override fails before any work.
    plans = {c.name: load_recipe(c.recipe, [*c.overrides, *budget.common()]) for c in cells}
    sections = {json.dumps([cfg.quant.to_dict(), cfg.calibration.__dict__], sort_keys=True): (cfg.quant,
                                                                                              cfg.calibration)
                for c in cells if c.shared for cfg in [plans[c.name]]}
    base_rows = build_bases(out, list(sections.values()), source=fingerprint)

    # Learning rates from the validation split.
    lrs, search = {}, []
    for family in ("lora", "diablo"):
        for quantized in (False, True):
            cell = _search_cell(cells, family, quantized)
            if cell is None:
                continue
            scores = {}
            for lr in budget.lr_grid[family]:
                entry = _run(out, cell, plans[cell.name], fingerprint, seed=0, lr=lr, steps=budget.search_steps,
                             evaluation=[f"eval.datasets={','.join(VAL_SETS)}", "eval.accuracy=false",
                                         f"eval.limit={budget.n_val}"], tag="search", budget=budget)
                scores[lr] = entry["loss_avg"]
                search.append({"family": family, "quantized": quantized, "cell": cell.name, "lr": lr,
                               "val_loss": entry["loss_avg"], "val_loss_per_set": entry["loss"]})
            lrs[(family, quantized)] = min(scores, key=scores.get)
            log.info("learning rate %s %s: %g (validation loss %s)", family,
                     "quantized" if quantized else "full precision", lrs[(family, quantized)],
                     ", ".join(f"{k:g}: {v:.4f}" for k, v in scores.items()))

    runs = []

    def report(final: bool) -> dict:
        results = summarize(cells, runs, PAIRS, budget.bits)
        results.update({"budget": asdict(budget), "bases": base_rows, "search": search, "complete": final,
                        "learning_rates": {f"{f}-{'quantized' if q else 'fp'}": v for (f, q), v in lrs.items()},
                        "seconds_this_sitting": time.perf_counter() - t0})
        write_report(out, results, echo=final)
        return results

    # Seed-major order, the 4-bit arm last: an interrupted study holds every cell of an arm at the same number of
    # seeds, and the 2-bit arm and full precision (the question users ask) finish first.
    order = [(seed, c) for seed in sorted({s for c in cells for s in budget.seeds_of(c)}) for c in cells
             if seed in budget.seeds_of(c)]
    for seed, cell in sorted(order, key=lambda sc: (sc[1].bits == 4, sc[0])):
        lr = lrs[(cell.family, cell.bits is not None)]
        runs.append(_run(out, cell, plans[cell.name], fingerprint, seed=seed, lr=lr, steps=budget.steps,
                         evaluation=[f"eval.datasets={','.join(TEST_SETS)}", f"eval.limit={budget.n_eval}"],
                         tag="final", budget=budget))
        report(final=False)  # an interrupted study still leaves the report of what it finished
    return report(final=True)


def _run(out: Path, cell: Cell, cfg, fingerprint: str, *, seed: int, lr: float, steps: int, evaluation: list[str],
         tag: str, budget: StudyBudget) -> dict:
    """One training run + evaluation, or its ledger entry when one with the same settings exists."""
    from ..eval.compare import load_run

    run_name = f"{tag}-{cell.name}-lr{lr:g}-s{seed}" if tag == "search" else f"{cell.name}-s{seed}"
    run_dir = out / "runs" / run_name
    overrides = [*cell.overrides, *budget.common(), f"train.max_steps={steps}", f"train.save_steps={steps}",
                 f"train.lr={lr}", f"train.seed={seed}", *evaluation, f"output_dir={run_dir}"]
    base = None
    if cell.shared:
        bdir = base_dir(out, cfg.quant)
        overrides.append(f"model.quantized={bdir.resolve()}")
        base = base_settings(bdir)
    stamp = {"recipe": cell.recipe, "overrides": [o for o in overrides if not o.startswith(("output_dir=",
                                                                                          "model.quantized="))],
             "model": fingerprint, "base": base}
    path = out / "ledger" / f"{run_name}.json"
    entry = read_cache(path)
    if entry is not None and _same_stamp(entry.get("stamp"), stamp):
        log.info("%s: done (ledger)", run_name)
        return entry
    log.info("%s: %s lr=%g seed=%d, %d steps", run_name, cell.recipe, lr, seed, steps)
    train_fresh(cell.recipe, overrides, run_dir)  # a run killed half-way, or of other settings: start again
    run = load_run(run_dir)
    sets = run["summary"]["datasets"]
    acc = {k: v["accuracy"] for k, v in sets.items() if v.get("accuracy") is not None}
    loss = {k: v["response_loss"]["loss"] for k, v in sets.items()}
    entry = {"run": run_name, "cell": cell.name, "tag": tag, "seed": seed, "lr": lr, "steps": steps,
             "stamp": stamp, "accuracy": acc, "loss": loss,
             "acc_avg": sum(acc.values()) / len(acc) if acc else None, "loss_avg": sum(loss.values()) / len(loss),
             "trainable_params": run["trainable_params"], "train_time_s": run["train_time_s"]}
    atomic_write_json(path, entry, seal=True)
    for ckpt in run_dir.glob("checkpoint-*"):  # the adapter is saved on its own; checkpoints only cost disk
        shutil.rmtree(ckpt, ignore_errors=True)
    return entry


def _same_stamp(a: dict | None, b: dict) -> bool:
    """Equal settings; the base's quantization compared as a :class:`QuantConfig` (a setting added to it later,
    absent from an older ledger entry, keeps its default), so a ledger written by an older lowbit stays valid."""
    from ..quant import QuantConfig

    if not isinstance(a, dict) or set(a) != set(b):
        return False
    norm = [QuantConfig.from_dict(x["base"]) if x.get("base") else None for x in (a, b)]
    return norm[0] == norm[1] and all(a[k] == b[k] for k in b if k != "base")
