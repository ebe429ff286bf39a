"""The experiment spec: a comparison written as data (YAML), validated like a recipe.

A spec names **cells** (a label, a recipe and its overrides: one method on one base), the **budget** every run gets
(steps, batch, examples, evaluation sets and limits), the **seeds**, how each run's **learning rate** is chosen (fixed
values, or a search on validation sets per cell, per method or per adapter family) and the **contrasts** it answers
(``a - b``, which must share a base unless marked ``different_bases``). Unknown keys list the valid ones; every
recipe is loaded, and every contrast checked, before any work. Built-in specs live in ``specs/`` beside this file,
each opening with the command that runs it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..recipes.config import apply_overrides, build_config, read_recipe, unknown_name_hint

SPEC_DIR = Path(__file__).parent / "specs"
SCOPES = ("cell", "method", "family")
METRICS = ("accuracy", "response_loss")


@dataclass
class EvalBudget:
    """How every final run is scored (``None``: the recipe's own setting). sets: ``eval.datasets``; limit:
    problems per set; loss_limit: records per set for the response loss (default ``limit``)."""

    sets: list[str] | None = None
    limit: int | None = None
    loss_limit: int | None = None
    max_new_tokens: int | None = None
    accuracy: bool = True
    response_loss: bool = False

    def __post_init__(self) -> None:
        for name in ("limit", "loss_limit", "max_new_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"budget.eval.{name} must be >= 1 or null, got {getattr(self, name)}")
        if not (self.accuracy or self.response_loss):
            raise ValueError("budget.eval measures nothing: set accuracy=true or response_loss=true")


@dataclass
class Budget:
    """The equal budget of every run (``None``: the recipe's own value). steps sets ``train.max_steps`` and
    ``train.save_steps``; num_examples: the training pool (``data.num_examples``); calib_samples:
    ``calibration.nsamples``; overrides: further recipe overrides applied to every run."""

    steps: int | None = None
    batch_size: int | None = None
    num_examples: int | None = None
    logging_steps: int | None = None
    calib_samples: int | None = None
    eval: EvalBudget = field(default_factory=EvalBudget)
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "num_examples", "logging_steps", "calib_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"budget.{name} must be >= 1 or null (the recipe's own), got {getattr(self, name)}")


@dataclass
class Search:
    """A learning-rate search: each ``grid`` value (per adapter, e.g. ``lora: [1e-3, 5e-3]``) trains ``steps``
    steps on the first of ``seeds`` (default: the spec's first seed) and is scored by the response loss on
    ``limit`` records of each validation ``sets`` (never a test set); the lowest loss wins. tie: rates within
    ``tie`` nats of the best are trained again on the other ``seeds`` and the lowest mean wins (a tie within one
    seed's noise is not decided by that seed). on: the cells searched (one per scope group; default: each group's
    cell with the data-free init, lowest bit width, first in the spec)."""

    grid: dict = field(default_factory=dict)
    steps: int = 60
    sets: list[str] = field(default_factory=list)
    limit: int = 100
    on: list[str] | None = None
    seeds: list[int] | None = None
    tie: float | None = None

    def __post_init__(self) -> None:
        if not self.grid or not all(isinstance(v, list) and v for v in self.grid.values()):
            raise ValueError(f"lr.search.grid must map adapters to lists of rates, e.g. {{lora: [1e-3, 5e-3]}}; got "
                             f"{self.grid!r}")
        self.grid = {k: [float(x) for x in v] for k, v in self.grid.items()}
        if self.steps < 1 or self.limit < 1:
            raise ValueError(f"lr.search.steps and limit must be >= 1, got {self.steps}, {self.limit}")
        if not self.sets:
            raise ValueError("lr.search.sets is empty: name validation sets, e.g. [synthetic-gsm8k-val]")
        bad = [s for s in self.sets if not s.endswith("-val")]
        if bad:
            raise ValueError(f"lr.search.sets {bad} are not validation sets (names ending in -val): tuning on a "
                             f"test set would bias the comparison")
        if self.seeds is not None and not self.seeds:
            raise ValueError("lr.search.seeds is empty; give at least one seed, or null for the spec's first seed")
        if self.tie is not None and (self.tie < 0 or not self.seeds or len(self.seeds) < 2):
            raise ValueError(f"lr.search.tie={self.tie} needs tie >= 0 and at least two lr.search.seeds (the "
                             f"second breaks ties), got seeds={self.seeds}")


@dataclass
class LearningRates:
    """scope: who shares a rate — ``cell``, ``method`` (adapter + init + precision) or ``family`` (adapter +
    precision). values: fixed rates per group (``lora-fp``, ``lora-quantized``, ``diablo-fp`` ... for ``family``;
    ``<adapter>-<init>-fp|quantized`` for ``method``; cell names for ``cell``). search: find them instead."""

    scope: str = "family"
    values: dict = field(default_factory=dict)
    search: Search | None = None

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"lr.scope must be one of {list(SCOPES)}, got {self.scope!r}")
        self.values = {k: float(v) for k, v in self.values.items()}


@dataclass
class Cell:
    """One method on one base: ``recipe`` (a built-in name or a YAML path) plus ``overrides``. seeds / lr: this
    cell's own (default: the spec's)."""

    name: str
    recipe: str
    label: str = ""
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] | None = None
    lr: float | None = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith(("search-", ".")):
            raise ValueError(f"cell name {self.name!r} must be a plain directory name, not starting with 'search-'")
        self.label = self.label or self.name


@dataclass
class Contrast:
    """``a - b``: the paired difference of two cells over their common seeds (and problems). different_bases: allow
    cells on different bases (the difference then mixes base and method). primary: a pre-registered question —
    the primary contrasts share one multiple-comparison correction per metric and get a verdict; the others are
    reported as exploratory (a pipeline difference when the bases differ)."""

    a: str
    b: str
    what: str = ""
    different_bases: bool = False
    primary: bool = False


@dataclass
class Analysis:
    """How the contrasts are judged. alpha: family-wise error rate of the primary contrasts per metric (Holm);
    margins: ``{metric: m}`` — a difference whose 95% interval lies inside ``[-m, m]`` is called equivalent;
    primary_metric: the endpoint the study is sized for (the other is secondary)."""

    alpha: float = 0.05
    margins: dict = field(default_factory=lambda: {"response_loss": 0.005, "accuracy": 1.0})
    primary_metric: str = "response_loss"

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"analysis.alpha must be in (0, 1), got {self.alpha}")
        bad = sorted(set(self.margins) - set(METRICS))
        if bad or self.primary_metric not in METRICS:
            raise ValueError(f"analysis metrics must be among {list(METRICS)}; got margins {sorted(self.margins)}, "
                             f"primary_metric {self.primary_metric!r}")
        self.margins = {k: float(v) for k, v in self.margins.items()}
        if any(v <= 0 for v in self.margins.values()):
            raise ValueError(f"analysis.margins must be > 0, got {self.margins}")


@dataclass
class ExperimentSpec:
    """A whole comparison. model: when set, every cell trains this model (``model.name``): the same comparison on
    another model. seeds: ``null`` keeps each recipe's own ``train.seed`` (one run per cell). before: also score
    each run's base without the adapter. base_perplexity: score each base's held-out perplexity (tiny model)."""

    name: str = "experiment"
    description: str = ""
    out: str = "experiment_out"
    model: str | None = None
    budget: Budget = field(default_factory=Budget)
    seeds: list[int] | None = None
    lr: LearningRates = field(default_factory=LearningRates)
    cells: list = field(default_factory=list)
    contrasts: list = field(default_factory=list)
    analysis: Analysis = field(default_factory=Analysis)
    before: bool = False
    base_perplexity: bool = False

    def __post_init__(self) -> None:
        self.cells = [c if isinstance(c, Cell) else build_config(Cell, c, f"cells[{i}].")
                      for i, c in enumerate(self.cells)]
        self.contrasts = [c if isinstance(c, Contrast) else build_config(Contrast, c, f"contrasts[{i}].")
                          for i, c in enumerate(self.contrasts)]
        if not self.cells:
            raise ValueError("the spec has no cells; add at least one {name, recipe}")
        names = [c.name for c in self.cells]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"cell names must be unique; repeated: {dup}")
        for c in self.contrasts:
            missing = [x for x in (c.a, c.b) if x not in names]
            if missing:
                raise ValueError(f"contrast {c.a} - {c.b} names unknown cells {missing}; cells: {names}")
        if any(c.primary and c.different_bases for c in self.contrasts):
            raise ValueError("a primary contrast must compare cells on one base (different_bases: false): a "
                             "pre-registered method question cannot mix base and method")
        if any(c.primary and c.different_bases for c in self.contrasts):
            raise ValueError("a primary contrast must compare cells on one base (different_bases: false): a "
                             "pre-registered method question cannot mix base and method")
        if self.seeds is not None and not self.seeds:
            raise ValueError("seeds is empty; give at least one seed, or null for the recipes' own")
        if self.lr.search is not None and self.lr.search.on:
            unknown = sorted(set(self.lr.search.on) - set(names))
            if unknown:
                raise ValueError(f"lr.search.on names unknown cells {unknown}; cells: {names}")

    def seeds_of(self, cell: Cell) -> list[int | None]:
        return list(cell.seeds if cell.seeds is not None else (self.seeds or [None]))


def builtin_specs() -> list[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


def find_spec(spec: str | Path) -> Path:
    """A spec file: a path (holding a ``/`` or ending in ``.yaml``; it must exist) or a built-in name."""
    text = str(spec)
    if "/" in text or os.sep in text or Path(text).suffix in (".yaml", ".yml"):
        p = Path(text).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"experiment spec {text} not found" + unknown_name_hint(
                p.stem, builtin_specs(), "`lowbit experiment --list` describes them; a built-in spec is named without "
                                         "a path"))
        return p
    if (SPEC_DIR / f"{text}.yaml").is_file():
        return SPEC_DIR / f"{text}.yaml"
    raise FileNotFoundError(f"no built-in experiment spec named {text!r}" + unknown_name_hint(
        text, builtin_specs(), f"`lowbit experiment --list` describes them; a spec file is given by its path, e.g. "
                               f"./{text}.yaml"))


def load_spec(spec: str | Path, overrides: list[str] | None = None) -> ExperimentSpec:
    """Read a spec (path or built-in name), apply dotted ``key=value`` overrides, validate."""
    raw = read_recipe(find_spec(spec))
    return build_config(ExperimentSpec, apply_overrides(raw, overrides or [], ExperimentSpec))


def spec_dict(spec: ExperimentSpec) -> dict:
    return dataclasses.asdict(spec)
