"""``lowbit experiment SPEC``: run a comparison written as an :class:`~lowbit.experiments.spec.ExperimentSpec`.

1. **Plan**: every cell's recipe is loaded with the budget's overrides (a bad key or recipe fails here, before any
   work) and the contrasts are checked (same base unless marked).
2. **Bases**: each distinct base (:func:`lowbit.recipes.bases.shared_base`: from the recipe's ``quant`` and
   ``calibration`` sections and the init registry) is quantized once under ``OUT/bases`` and shared.
3. **Learning rates**: fixed, or searched per scope group on validation sets (response loss, first seed).
4. **Runs**: every (cell, seed), seed-major, trained and then scored by the recipe's evaluation.
5. **Report**: ``OUT/results.json``, ``OUT/report.md`` (+ ``comparison.md``/``comparison.png`` where each cell ran
   once) — rewritten after every run, so an interrupted experiment still reports what it finished.

Resumable: each finished run is one sealed ledger file ``OUT/ledger/<run>.json`` (:mod:`.ledger`) keyed by its full
settings, its base's weight hash and the model's; a rerun skips every run whose entry matches and trains only the
rest. ``OUT/runs`` holds the run directories (a trained run whose evaluation was cut short resumes its evaluation).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ..io import DamagedFileError, atomic_write_json, read_json
from ..recipes.bases import BaseSpec, base_kind, base_perplexity, build_base, model_weights_sha256, shared_base
from ..recipes.config import TINY, RecipeConfig, load_recipe
from ..recipes.eval_settings import check_eval_sets
from .ledger import Ledger
from .report import write_report
from .spec import Cell, ExperimentSpec

log = logging.getLogger(__name__)


@dataclass
class CellPlan:
    """A cell's recipe loaded with the budget (learning rate and seed still open), its base and its lr group."""

    cell: Cell
    overrides: list[str]
    cfg: RecipeConfig
    base: BaseSpec | None
    group: str
    base_dir: Path | None = None
    base_weights: str | None = None
    extra: dict = field(default_factory=dict)


def budget_overrides(spec: ExperimentSpec, cell: Cell) -> list[str]:
    """The overrides every final run of ``cell`` gets (cell's own first, then the model and the budget)."""
    b, e = spec.budget, spec.budget.eval
    out = list(cell.overrides) + ([f"model.name={spec.model}"] if spec.model else [])
    for key, v in (("data.num_examples", b.num_examples), ("train.batch_size", b.batch_size),
                   ("train.logging_steps", b.logging_steps), ("calibration.nsamples", b.calib_samples),
                   ("eval.max_new_tokens", e.max_new_tokens), ("eval.limit", e.limit),
                   ("eval.loss_limit", e.loss_limit)):
        if v is not None:
            out.append(f"{key}={v}")
    if e.sets is not None:
        out.append(f"eval.datasets={','.join(e.sets)}")
    if e.response_loss:
        out.append("eval.response_loss=true")
    if not e.accuracy:
        out.append("eval.accuracy=false")
    if b.steps is not None:
        out += [f"train.max_steps={b.steps}", f"train.save_steps={b.steps}"]
    return out + list(b.overrides)


def lr_group(spec: ExperimentSpec, cell: Cell, cfg: RecipeConfig) -> str:
    """Who shares a learning rate: the cell, its method (adapter + init + precision) or its adapter family."""
    precision = "fp" if cfg.quant is None else "quantized"
    return {"cell": cell.name, "method": f"{cfg.adapter.adapter}-{cfg.adapter.init}-{precision}",
            "family": f"{cfg.adapter.adapter}-{precision}"}[spec.lr.scope]


def plan(spec: ExperimentSpec) -> dict[str, CellPlan]:
    """Load every cell's recipe (all errors before any work) and check the contrasts."""
    plans = {}
    for cell in spec.cells:
        overrides = budget_overrides(spec, cell)
        cfg = load_recipe(cell.recipe, overrides)
        if cfg.eval is None:
            raise ValueError(f"cell {cell.name}: recipe {cell.recipe} has no eval section (eval=null), so the "
                             f"experiment cannot score it; give it one (budget.eval.sets=...)")
        check_eval_sets(cfg.eval.datasets, (cfg.eval.limit, cfg.eval.loss_limit), cfg.eval.data_dir)
        plans[cell.name] = CellPlan(cell, overrides, cfg, shared_base(cfg), lr_group(spec, cell, cfg))
    if spec.lr.search is not None:
        check_eval_sets(spec.lr.search.sets, (spec.lr.search.limit,), next(iter(plans.values())).cfg.eval.data_dir)
    if spec.base_perplexity and {p.cfg.model.name for p in plans.values()} != {TINY}:
        raise ValueError(f"base_perplexity: true scores the embedded tiny model's held-out text, but the cells train "
                         f"{sorted({p.cfg.model.name for p in plans.values()})}; set base_perplexity: false")
    for p in plans.values():  # fixed rates without a search: every cell needs one (none: each recipe's own train.lr)
        if spec.lr.values and spec.lr.search is None and p.cell.lr is None and p.group not in spec.lr.values:
            raise ValueError(f"cell {p.cell.name}: no learning rate for its group {p.group!r} (lr.scope="
                             f"{spec.lr.scope}); add lr.values.{p.group}, the cell's lr, or an lr.search")
    for c in spec.contrasts:
        a, b = plans[c.a], plans[c.b]
        if not c.different_bases and base_identity(a) != base_identity(b):
            raise ValueError(f"contrast {c.a} - {c.b}: the cells train on different bases ({base_identity(a)} vs "
                             f"{base_identity(b)}), so the difference mixes base and method; put them on one base "
                             f"or mark the contrast different_bases: true")
    return plans


def base_identity(p: CellPlan) -> str:
    kind = base_kind(p.cfg)
    if kind == "own":
        return f"its own base ({p.cfg.adapter.init} on {p.cfg.quant.method} {p.cfg.quant.bits}-bit, {p.cell.name})"
    return f"the float model {p.cfg.model.name}" if p.base is None else f"base {p.base.key}"


def build_bases(spec: ExperimentSpec, plans: dict[str, CellPlan], out: Path) -> list[dict]:
    """Quantize each distinct shared base once (cached) and point its cells at it; -> the bases' rows (with
    held-out perplexity when the spec asks for it, cached by weight hash in ``OUT/bases/perplexity.json``)."""
    built: dict[str, tuple[Path, str]] = {}
    for p in sorted((p for p in plans.values() if p.base is not None), key=lambda p: (-p.base.quant.bits, p.base.key)):
        if p.base.key not in built:
            built[p.base.key] = build_base(p.base, out / "bases")
        p.base_dir, p.base_weights = built[p.base.key]
    ppl_file = out / "bases" / "perplexity.json"
    cache = (read_cache(ppl_file) or {}) if spec.base_perplexity else {}
    models = sorted({p.cfg.model.name for p in plans.values()})
    rows = [{"base": f"{m} (full precision)", "key": None, "weights_sha256": model_weights_sha256(m),
             "dir": None, "model": m} for m in models]
    rows += [{"base": f"{k.rsplit('-', 1)[0]}", "key": k, "weights_sha256": w, "dir": str(d), "model": None}
             for k, (d, w) in built.items()]
    for r in rows:
        r["ppl"] = None
        if spec.base_perplexity and r["weights_sha256"]:
            if r["weights_sha256"] not in cache:
                cache[r["weights_sha256"]] = base_perplexity(r["model"] or _model_of(plans, r["key"]), r["dir"])
                atomic_write_json(ppl_file, cache, seal=True)
            r["ppl"] = cache[r["weights_sha256"]]
    return rows


def _model_of(plans: dict[str, CellPlan], key: str) -> str:
    return next(p.base.model for p in plans.values() if p.base is not None and p.base.key == key)


def read_cache(path: Path) -> dict | None:
    """A sealed cache file's mapping, or ``None`` when missing or damaged (logged: it is recomputed)."""
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except DamagedFileError as e:
        log.warning("%s; recomputing it", e.reason)
        return None


def _run_overrides(p: CellPlan, run_dir: Path, *, lr: float | None, seed: int | None, steps: int | None = None,
                   evaluation: list[str] = ()) -> list[str]:
    extra = [f"train.lr={lr}"] if lr is not None else []
    extra += [f"train.seed={seed}"] if seed is not None else []
    extra += [f"train.max_steps={steps}", f"train.save_steps={steps}"] if steps is not None else []
    extra += [*evaluation, f"output_dir={run_dir}"]
    if p.base_dir is not None:
        extra.append(f"model.quantized={p.base_dir.resolve()}")
    return [*p.overrides, *extra]


def search_cells(spec: ExperimentSpec, plans: dict[str, CellPlan]) -> dict[str, CellPlan]:
    """Per lr group the cell its rate is searched on: the one named in ``lr.search.on``, else the group's cell with
    the data-free init and no overrides, lowest bit width, first in the spec (else the group's first cell)."""
    groups: dict[str, list[CellPlan]] = {}
    for p in plans.values():
        if p.cell.lr is None and p.group not in spec.lr.values:
            groups.setdefault(p.group, []).append(p)
    chosen = {}
    for g, ps in groups.items():
        named = [p for p in ps if p.cell.name in (spec.lr.search.on or [])]
        if len(named) > 1:
            raise ValueError(f"lr.search.on names {len(named)} cells of group {g}: {[p.cell.name for p in named]}")
        plain = [p for p in ps if p.cfg.adapter.init == "default" and not p.cell.overrides]
        pool = named or sorted(plain, key=lambda p: p.cfg.quant.bits if p.cfg.quant else 0) or ps
        chosen[g] = pool[0]
    return chosen


def learning_rates(spec: ExperimentSpec, plans: dict[str, CellPlan], ledger: Ledger) -> tuple[dict, list]:
    """``{group: lr}`` (fixed values, then searched ones) and the search's rows (one per rate and seed)."""
    rates, rows = dict(spec.lr.values), []
    if spec.lr.search is None:
        return rates, rows
    s = spec.lr.search
    seeds = s.seeds or [spec.seeds_of(spec.cells[0])[0]]
    for group, p in search_cells(spec, plans).items():
        grid = s.grid.get(p.cfg.adapter.adapter)
        if not grid:
            raise ValueError(f"lr.search.grid has no rates for adapter {p.cfg.adapter.adapter!r} (group {group})")
        scores = {lr: [_search_run(spec, p, group, lr, seeds[0], ledger, rows)] for lr in grid}
        best = min(v[0] for v in scores.values())
        close = [lr for lr, v in scores.items() if s.tie is not None and v[0] - best <= s.tie]
        if len(close) > 1:  # rates within one seed's noise of the best: decided by the mean over all seeds
            for lr in close:
                scores[lr] += [_search_run(spec, p, group, lr, seed, ledger, rows) for seed in seeds[1:]]
        means = {lr: sum(v) / len(v) for lr, v in scores.items()}
        rates[group] = min(close or scores, key=means.get)
        log.info("learning rate %s: %g (validation loss %s)", group, rates[group],
                 ", ".join(f"{k:g}: {v:.4f}" + (f" (mean of {len(scores[k])} seeds)" if len(scores[k]) > 1 else "")
                           for k, v in means.items()))
    return rates, rows


def _search_run(spec: ExperimentSpec, p: CellPlan, group: str, lr: float, seed: int | None, ledger: Ledger,
                rows: list) -> float:
    """Train ``p`` at ``lr`` for the search's steps; -> its validation response loss (also appended to ``rows``)."""
    s = spec.lr.search
    name = f"search-{p.cell.name}-lr{lr:g}" + (f"-s{seed}" if seed is not None else "")
    evaluation = [f"eval.datasets={','.join(s.sets)}", "eval.accuracy=false", "eval.response_loss=true",
                  f"eval.limit={s.limit}", f"eval.loss_limit={s.limit}"]
    overrides = partial(_run_overrides, p, lr=lr, seed=seed, steps=s.steps, evaluation=evaluation)
    entry = ledger.run(name, p, overrides,
                       meta={"tag": "search", "cell": p.cell.name, "group": group, "lr": lr, "seed": seed})
    rows.append({"group": group, "cell": p.cell.name, "lr": lr, "seed": seed, "val_loss": entry["loss_avg"]})
    return entry["loss_avg"]


def preregister(spec: ExperimentSpec, out: Path) -> dict:
    """Record the questions (the primary contrasts and the analysis) before the first final run in
    ``OUT/preregistration.json``; a later sitting whose questions differ is refused (changing them after seeing
    results would bias them). Exploratory contrasts may be added at any time."""
    text = {"contrasts": [dataclasses.asdict(c) for c in spec.contrasts if c.primary],
            "analysis": dataclasses.asdict(spec.analysis)}
    path = out / "preregistration.json"
    if path.is_file():
        stored = read_json(path, f"restore {path} from its copy, or start the experiment in a new --out")
        if {k: stored[k] for k in text} != text:
            raise ValueError(f"{spec.name}: the primary contrasts or analysis differ from those registered in {path} "
                             f"(written {stored['written']}) before the first final run; results already seen "
                             f"must not change the questions. Restore them, or run the new questions in a new "
                             f"--out")
        return stored
    finished = [f.stem for f in (out / "ledger").glob("*.json") if not f.stem.startswith("search-")]
    if text["contrasts"] and finished:
        raise ValueError(f"{spec.name}: {len(finished)} final runs exist in {out} (e.g. {finished[0]}) but no "
                         f"{path.name}: primary contrasts can only be registered before the first final run. Run "
                         f"them in a new --out, or mark them exploratory (primary: false)")
    stored = {**text, "written": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    atomic_write_json(path, stored, seal=True)
    return stored


def run_experiment(spec: ExperimentSpec, out: str | Path | None = None) -> dict:
    """Run (or resume) ``spec``; write and return the report's ``results.json`` content."""
    out = Path(out or spec.out)
    t0 = time.perf_counter()
    plans = plan(spec)
    bases = build_bases(spec, plans, out)
    ledger = Ledger(out, model_weights_sha256)
    rates, search = learning_rates(spec, plans, ledger)
    preregister(spec, out)
    order = [(seed, c) for c in spec.cells for seed in spec.seeds_of(c)]
    order.sort(key=lambda sc: -1 if sc[0] is None else sc[0])  # seed-major: every cell at n seeds before n+1
    runs = []
    for i, (seed, cell) in enumerate(order):
        p = plans[cell.name]
        lr = cell.lr if cell.lr is not None else rates.get(p.group)
        name = cell.name + (f"-s{seed}" if seed is not None else "")
        log.info("[%d/%d] %s", i + 1, len(order), name)
        runs.append(ledger.run(name, p, partial(_run_overrides, p, lr=lr, seed=seed),
                               meta={"tag": "final", "cell": cell.name, "seed": seed, "lr": lr},
                               before=spec.before))
        write_report(out, spec, plans, runs, rates, search, t0, complete=False, bases=bases)
    return write_report(out, spec, plans, runs, rates, search, t0, complete=True, bases=bases)
