"""``lowbit demo``: the DiaBlo-vs-CLoQ-vs-baselines comparison on the embedded tiny model, end to end.

1. Quantized bases, computed once and cached under ``OUT/bases`` (NF, GPTQ, MagR+GPTQ at 4 and 2 bits), with
   held-out perplexity against full precision (the damage fine-tuning must repair).
2. One fine-tuning run per (bits, method) — QLoRA, GPTQ-LoRA, LoftQ, ApiQ-bw, CLoQ, DiaBlo (MagR), calibrated
   DiaBlo — plus full-precision LoRA and DiaBlo references, each the built-in ``tiny-*`` recipe with the same
   demo budget (steps, batch, evaluation problems). Methods on the same base share the cached one.
3. ``lowbit compare`` over the runs: the markdown table (printed), ``results.json`` and ``comparison.png``.

Everything is cached: a run whose directory already holds ``run.json`` and ``summary.json`` for the same settings
is skipped, so a second ``lowbit demo`` only redoes what changed. A cache entry that is damaged (a base whose files
fail their checksums, an unreadable ``perplexity.json``, ``demo_stamp.json``, ``run.json`` or ``summary.json``) is
not an error: that step runs again, with a warning.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ..io import atomic_write_json, atomic_write_text, read_json, recover_dir, sha256_file

log = logging.getLogger(__name__)

# (recipe key, label, shares a cached base): the base is the recipe's own ``quant`` section, built once per distinct
# section and shared; LoftQ and ApiQ-bw quantize the base themselves.
METHODS = [
    ("qlora", "QLoRA", True), ("gptq-lora", "GPTQ-LoRA", True), ("loftq", "LoftQ", False),
    ("apiq-bw", "ApiQ-bw", False), ("cloq", "CLoQ", True), ("diablo", "DiaBlo (MagR)", True),
    ("diablo-calibrated", "DiaBlo calibrated (MagR)", True),
]
QUICK_METHODS = [m[0] for m in METHODS]  # every method, at the toy budget: the default tests run each end to end


@dataclass
class DemoBudget:
    """The equal training and evaluation budget of every method. ``None``: the recipe's own value (ApiQ-bw's
    epochs, MagR's iterations), so the demo's methods run as the recipes define them."""

    steps: int = 30
    batch_size: int = 16
    # Per adapter family and precision, the rates `lowbit study` chose on its validation split (docs/study): one
    # shared rate would favour the family it was tuned on.
    lr: float = 5e-3  # LoRA, every base
    lr_diablo: float = 1e-2  # DiaBlo on the full-precision base
    lr_diablo_quantized: float = 2e-2  # DiaBlo on a quantized base
    n_eval: int = 30
    max_new_tokens: int = 80
    calib_samples: int = 32
    apiq_epochs: int | None = None
    magr_iters: int | None = None

    def lr_for(self, recipe: str, quantized: bool) -> float:
        if "diablo" not in recipe:
            return self.lr
        return self.lr_diablo_quantized if quantized else self.lr_diablo

    def overrides(self, quantized: bool, recipe: str = "") -> list[str]:
        # One pass over steps x batch examples: every method sees the same examples, and nothing else is tokenised.
        out = [f"data.num_examples={self.steps * self.batch_size}", f"train.max_steps={self.steps}",
               f"train.batch_size={self.batch_size}", f"train.lr={self.lr_for(recipe, quantized)}",
               "train.logging_steps=5", f"train.save_steps={max(self.steps, 1)}", f"eval.limit={self.n_eval}",
               f"eval.max_new_tokens={self.max_new_tokens}", f"calibration.nsamples={self.calib_samples}"]
        if self.apiq_epochs is not None:
            out.append(f"adapter.apiq_epochs={self.apiq_epochs}")
        return out + ([f"quant.magr_iters={self.magr_iters}"] if quantized and self.magr_iters is not None else [])

    def describe(self) -> str:
        """The budget in one line, saying where it departs from the recipes."""
        apiq = "as its recipe" if self.apiq_epochs is None else f"{self.apiq_epochs} (the recipes: 5)"
        magr = "as the recipes" if self.magr_iters is None else f"{self.magr_iters} (the recipes: 200)"
        return (f"equal budget per method: {self.steps} steps x batch {self.batch_size}, lr {self.lr:g} (LoRA), "
                f"{self.lr_diablo:g} / {self.lr_diablo_quantized:g} (DiaBlo, full precision / quantized base), "
                f"{self.calib_samples} calibration windows, {self.n_eval} test problems per family; ApiQ-bw "
                f"epochs {apiq}; MagR iterations {magr}")


#: The tests' toy budget: a few steps, one ApiQ-bw epoch, 20 MagR iterations (the recipes: 5 and 200).
QUICK_BUDGET = DemoBudget(steps=4, batch_size=8, n_eval=4, max_new_tokens=24, calib_samples=8, apiq_epochs=1,
                          magr_iters=20)


def demo_runs(quick: bool) -> list[tuple[str, str, int | None, bool]]:
    """(run name, recipe, bits, shares a cached base) in table order."""
    keys = QUICK_METHODS if quick else [m[0] for m in METHODS]
    runs = [("fp-lora", "tiny-lora-fp", None, False)]
    if not quick:
        runs.append(("fp-diablo", "tiny-diablo-fp", None, False))
    for bits in (4, 2):
        for key, _, shared in METHODS:
            if key in keys:
                runs.append((f"{bits}bit-{key}", f"tiny-{key}-{bits}bit", bits, shared))
    return runs


def model_fingerprint() -> str:
    """SHA-256 (first 16 hex digits) of the embedded model's weights: caches built from another checkpoint are stale."""
    from ..models.tiny import tiny_model_dir

    return sha256_file(tiny_model_dir() / "model.safetensors")[:16]


def base_dir(out: Path, quant) -> Path:
    return out / "bases" / f"{quant.method}-{quant.bits}bit"


def build_bases(out: Path, sections: list, source: str | None = None) -> list[dict]:
    """Quantize the tiny model once per distinct recipe ``(quant, calibration)`` section into ``OUT/bases``
    (skipped when cached with the same settings); returns rows with held-out perplexity. ``source`` is the tiny
    model's :func:`model_fingerprint` (computed when None)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..eval.perplexity import perplexity
    from ..models.tiny import heldout_text_ids, tiny_model_dir
    from ..quant import QuantConfig, load_quantized, quantize_model, save_quantized
    from .quantize import calibration_windows

    src = tiny_model_dir()
    tok = AutoTokenizer.from_pretrained(src)
    held = heldout_text_ids(tok, n_docs=400)
    cache = out / "bases" / "perplexity.json"
    ppl = read_cache(cache) or {}
    source = source or model_fingerprint()
    if ppl.get("source") != source:  # built from another checkpoint of the tiny model: rebuild everything
        ppl = {"source": source}
    if "fp" not in ppl:
        fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        ppl["fp"] = perplexity(fp, held, 256, max_windows=16)
    rows = [{"base": "full precision", "bits": 16, "ppl": ppl["fp"], "ratio": 1.0, "seconds": 0.0}]
    for qcfg, calib_cfg in sorted(sections, key=lambda s: (-s[0].bits, s[0].method)):
        d = base_dir(out, qcfg)
        key = f"{qcfg.method}-{qcfg.bits}"
        t = 0.0
        stored = base_settings(d)
        # Compared as configurations: a setting added to QuantConfig later (stored dicts lack it) keeps its default.
        if stored is None or QuantConfig.from_dict(stored) != qcfg or key not in ppl:
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
            t0 = time.perf_counter()
            quantize_model(model, qcfg, calibration_windows(calib_cfg, tok)[0], progress=False)
            t = time.perf_counter() - t0
            save_quantized(model, d, qcfg, tokenizer=tok, source="tiny")
            ppl.pop(key, None)
        if key not in ppl:
            ppl[key] = perplexity(load_quantized(d), held, 256, max_windows=16)
        atomic_write_json(cache, ppl, seal=True)  # per base: a killed demo keeps what it built
        rows.append({"base": qcfg.method, "bits": qcfg.bits, "ppl": ppl[key], "ratio": ppl[key] / ppl["fp"],
                     "seconds": t})
        log.info("base %s %d-bit: held-out ppl %.3f (%.2fx full precision)", qcfg.method, qcfg.bits, ppl[key],
                 ppl[key] / ppl["fp"])
    atomic_write_json(cache, ppl, seal=True)
    return rows


def read_cache(path: Path):
    """A cache file's JSON, or ``None`` when it is missing or damaged (then logged: the step runs again)."""
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except ValueError as e:
        log.warning("%s; running that step again", str(e).split("; re-create it")[0])
        return None


def base_settings(d: Path) -> dict | None:
    """The quantization of a cached base, or ``None`` when there is none or it is damaged (any file failing its
    checksum: then it is rebuilt)."""
    from ..quant import verify_quantized

    if not (recover_dir(d) / "quant_config.json").is_file():
        return None
    try:
        return verify_quantized(d).get("quantization")
    except (ValueError, OSError) as e:
        log.warning("cached base %s is damaged (%s); rebuilding it", d, str(e).split("; re-create it")[0])
        return None


def cached_run(run_dir: Path, stamp: dict, need_summary: bool = True) -> bool:
    """A finished run with the same settings: same recipe overrides and the same cached base, its ``run.json`` (and
    ``summary.json``) intact."""
    files = ["run.json", "summary.json"] if need_summary else ["run.json"]
    if not all((run_dir / f).is_file() for f in files):
        return False
    return read_cache(run_dir / "demo_stamp.json") == stamp and all(read_cache(run_dir / f) is not None
                                                                     for f in files)


def train_fresh(recipe: str, overrides: list[str], run_dir: Path) -> None:
    """Fine-tune ``recipe`` with ``overrides`` (which name ``run_dir`` as ``output_dir``) from scratch. Whatever is
    in ``run_dir`` is a run the caller decided not to reuse (half-finished, or of other settings) and is deleted
    first, so the new run cannot resume from it or mix files with it."""
    import shutil

    from .config import load_recipe
    from .finetune import finetune

    cfg = load_recipe(recipe, overrides)  # a bad recipe fails here, before anything is deleted
    if recover_dir(run_dir).exists():
        shutil.rmtree(run_dir)
    finetune(cfg)


def run_demo(out_dir: str | Path = "demo_out", quick: bool = False, budget: DemoBudget | None = None) -> dict:
    """Run (or reuse) every comparison run; print and write the table. Returns ``results.json``'s content."""
    from ..eval.compare import compare_table, load_run, plot_runs
    from .config import load_recipe

    out = Path(out_dir)
    budget = budget or (QUICK_BUDGET if quick else DemoBudget())
    t_start = time.perf_counter()
    plans = []
    for name, recipe, bits, shared in demo_runs(quick):
        overrides = [*budget.overrides(quantized=bits is not None, recipe=recipe), f"output_dir={out / 'runs' / name}"]
        plans.append((name, recipe, overrides, load_recipe(recipe, overrides) if shared else None))
    # One base per distinct (quant, calibration) section of the recipes that share a cached base.
    sections = {json.dumps([c.quant.to_dict(), c.calibration.__dict__], sort_keys=True): (c.quant, c.calibration)
                for *_, c in plans if c is not None}
    fingerprint = model_fingerprint()
    base_rows = build_bases(out, list(sections.values()), source=fingerprint)
    done = []
    for i, (name, recipe, overrides, shared_cfg) in enumerate(plans):
        run_dir = out / "runs" / name
        if shared_cfg is not None:
            overrides = [*overrides, f"model.quantized={base_dir(out, shared_cfg.quant).resolve()}"]
        stamp = {"recipe": recipe, "overrides": overrides, "model": fingerprint,
                 "base": base_settings(base_dir(out, shared_cfg.quant)) if shared_cfg is not None else None}
        if cached_run(run_dir, stamp):
            log.info("[%d/%d] %s: cached", i + 1, len(plans), name)
        else:
            log.info("[%d/%d] %s: %s", i + 1, len(plans), name, recipe)
            train_fresh(recipe, overrides, run_dir)
            atomic_write_json(run_dir / "demo_stamp.json", stamp, seal=True)
        done.append(load_run(run_dir))
    table = compare_table(done)
    plot_runs(done, out / "comparison.png")
    results = {"budget": budget.__dict__, "quick": quick, "bases": base_rows,
               "runs": [{k: v for k, v in r.items() if k != "summary"} | {"accuracy": _accs(r)} for r in done],
               "seconds": time.perf_counter() - t_start}
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "comparison.md", table + "\n")
    print(format_bases(base_rows))
    print()
    print(table)
    print(f"\n({budget.describe()}; {results['seconds']:.0f}s; results in {out})")
    print(f"One run per method at this budget is an anecdote (about ±{_stderr(budget.n_eval):.0f} points of standard "
          f"error per average). The comparison that resolves (learning rates tuned per adapter family on a "
          f"validation split, several seeds, matched bases, 95% intervals) is `lowbit study`; its committed results: "
          f"{STUDY_RESULTS}")
    return results


STUDY_RESULTS = "docs/study/study.md"


def _stderr(n_eval: int, families: int = 4, p: float = 0.3) -> float:
    """Binomial standard error (points) of an average over ``families`` sets of ``n_eval`` problems near ``p``."""
    return 100 * (p * (1 - p) / (n_eval * families)) ** 0.5


def _accs(run: dict) -> dict:
    return {k: v.get("accuracy") for k, v in run["summary"]["datasets"].items()}


def format_bases(rows: list[dict]) -> str:
    lines = ["| bits | base | held-out ppl | ppl / full precision | quantize time (s) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['bits']} | {r['base']} | {r['ppl']:.3f} | {r['ratio']:.2f} | {r['seconds']:.1f} |")
    return "\n".join(lines)
