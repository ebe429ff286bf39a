"""The experiment ledger: one sealed JSON file per finished run, ``OUT/ledger/<run>.json``.

An entry holds the run's **key** — the full resolved recipe (every ``QuantConfig`` field included, so a changed
solver or option is a different run; the output directory and the cached base's path left out), the base's settings
and weight hash, and the model's weight hash — and what the run measured: per-set accuracy and response loss, and
**per problem** the prediction, whether it was correct and its response loss, plus the training set's hash. A run
whose entry exists with the same key is never trained again; a damaged entry is logged and the run redone.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from ..io import DamagedFileError, atomic_write_json, read_json
from ..recipes.config import load_recipe
from ..recipes.evaluate import EvaluateRun, run_evaluation
from ..recipes.finetune import evaluate_run, finetune
from ..recipes.initialised import initialise
from ..recipes.results import run_results
from ..rundir import DONE, RunDir

log = logging.getLogger(__name__)

FORMAT = 1
STAMP = "experiment_run.json"  # beside finetune's own stamp: "trained by this experiment with these settings"


def run_key(cfg, recipe: str, base_settings: dict | None, base_weights: str | None, model_weights: str | None) -> dict:
    """What determines a run's result: the resolved recipe without where it writes, and the identities of its base
    and model (weight hashes, not only settings)."""
    config = cfg.to_dict()
    config.pop("output_dir", None)
    config["model"] = {k: v for k, v in config["model"].items() if k != "quantized"}
    return {"format": FORMAT, "recipe": recipe, "config": config, "base": base_settings,
            "base_weights_sha256": base_weights, "model_weights_sha256": model_weights}


class Ledger:
    """The sealed entries under ``out/ledger`` and the run directories under ``out/runs``."""

    def __init__(self, out: Path, model_hash: Callable[[str], str | None]) -> None:
        self.out, self.model_hash, self._hashes = Path(out), model_hash, {}

    def path(self, name: str) -> Path:
        return self.out / "ledger" / f"{name}.json"

    def entry(self, name: str) -> dict | None:
        """A finished run's entry, or ``None`` (missing, or damaged: then logged and redone)."""
        p = self.path(name)
        if not p.is_file():
            return None
        try:
            return read_json(p)
        except DamagedFileError as e:
            log.warning("%s; running %s again", e.reason, name)
            return None

    def _model_hash(self, model: str) -> str | None:
        if model not in self._hashes:
            self._hashes[model] = self.model_hash(model)
        return self._hashes[model]

    def run(self, name: str, p, overrides: Callable[[Path], list[str]], meta: dict, before: bool = False) -> dict:
        """The entry of run ``name`` (cell plan ``p``): from the ledger when its key matches, else trained (unless
        its directory already holds the same trained run), evaluated and recorded."""
        run_dir = self.out / "runs" / name
        cfg = load_recipe(p.cell.recipe, overrides(run_dir))
        key = run_key(cfg, p.cell.recipe, p.base.settings() if p.base else None, p.base_weights,
                      self._model_hash(cfg.model.name))
        entry = self.entry(name)
        if entry is not None and entry.get("key") == key:
            log.info("%s: done (ledger)", name)
            return entry
        info = self._trained(run_dir, key)
        if info is None:  # not trained with these settings, killed before it finished, or damaged: from scratch
            RunDir(run_dir, "experiment-run", stamp=STAMP).clear()
            log.info("%s: training %s (%s)", name, p.cell.recipe, ", ".join(f"{k}={v}" for k, v in meta.items()))
            finetune(load_recipe(p.cell.recipe, [*overrides(run_dir), "eval=null"]))
            RunDir(run_dir, "experiment-run", stamp=STAMP).finish(key)
            info = read_json(run_dir / "run.json", f"delete {run_dir} and run the experiment again")
        summary = evaluate_run(cfg, run_dir, info["base"])  # resumes from rows already generated
        entry = {"run": name, **meta, "key": key, "base_dir": info["base"], **run_results(run_dir, summary)}
        if before:
            entry["before"] = self._before(name, p, info["base"], cfg, overrides)
        atomic_write_json(self.path(name), entry, seal=True)
        for ckpt in run_dir.glob("checkpoint-*"):  # the adapter is saved on its own; checkpoints only cost disk
            shutil.rmtree(ckpt, ignore_errors=True)
        return entry

    @staticmethod
    def _trained(run_dir: Path, key: dict) -> dict | None:
        """``run.json`` of a run this experiment finished training with ``key``; ``None`` otherwise (a damaged
        stamp or ``run.json`` is logged: the run trains again)."""
        if RunDir(run_dir, "experiment-run", stamp=STAMP).state(key) != DONE:
            return None
        try:
            return read_json(run_dir / "run.json")
        except (DamagedFileError, FileNotFoundError) as e:
            log.warning("%s; training %s again", getattr(e, "reason", e), run_dir.name)
            return None

    def _before(self, name: str, p, base: str, cfg, overrides: Callable[[Path], list[str]]) -> dict:
        """The run's base scored without the adapter, once per base (``OUT/before/<base>``); for an init that is
        not the data-free default also with the adapter as initialised (``initialised``), once per cell."""
        label = p.base.key if p.base is not None else ("fp-" + Path(base).name if cfg.quant is None
                                                       else f"own-{name}")
        out = {"base": label, **_scores(run_evaluation(EvaluateRun(model=base, eval=cfg.eval, progress=False,
                                                                     out=str(self.out / "before" / label))))}
        if cfg.adapter.init != "default":
            out["initialised"] = self._initialised(p, cfg, overrides)
        return out

    def _initialised(self, p, cfg, overrides: Callable[[Path], list[str]]) -> dict:
        """``cfg``'s adapter as initialised (no step trained), scored on its evaluation; cached under
        ``OUT/before/init-<cell>`` by the cell's settings (``overrides`` builds the run's, as for training)."""
        where = self.out / "before" / f"init-{p.cell.name}"
        key = {**cfg.to_dict(), "output_dir": None, "train": None}  # training settings do not change the init
        stamp = RunDir(where, "initialised-adapter", stamp=STAMP)
        if stamp.state(key) == DONE:
            base = stamp.read_stamp()["base"]
        else:
            stamp.clear()
            seed = load_recipe(p.cell.recipe, p.overrides).train.seed  # the cell's, not the run's: one init per cell
            base = initialise(load_recipe(p.cell.recipe, [*overrides(where), f"train.seed={seed}"]), where)
            stamp.finish(key, base=base)
        return _scores(run_evaluation(EvaluateRun(model=base, eval=cfg.eval, adapter=str(where / "adapter"),
                                                  out=str(where / "eval"), progress=False)))


def _scores(summary: dict) -> dict:
    sets = summary["datasets"].items()
    return {"accuracy": {k: d.get("accuracy") for k, d in sets},
            "loss": {k: (d.get("response_loss") or {}).get("loss") for k, d in sets}}
