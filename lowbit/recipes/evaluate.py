"""``lowbit evaluate``: accuracy of a model (plain or lowbit-quantized, maybe with an adapter) on Math10K test sets.

Protocol (:mod:`lowbit.eval.config`): the ApiQ prompt, greedy decoding, 512 new tokens, the last number (numeric
sets) or the option letter (AQuA) as the prediction. ``variant="llm-adapters"`` is the original LLM-Adapters script
instead: its prompt whitespace, 4-beam search, 256 new tokens. ``--max-new-tokens``/``--num-beams`` override
either. The AQuA rule (``choice_rule``: ``llm-adapters`` = first capital A–E, ``strict`` = "answer is (X)") only
changes scoring; the summary reports choice sets under both rules.

Files written under ``--out``:

* ``settings.json``: what determines the generations (model, adapter, prompt, beams, max new tokens, dtype, and a
  fingerprint of the weight files: their recorded SHA-256 for lowbit directories, else names, sizes and times); a
  rerun with other settings is refused unless ``--overwrite``, and so are rows without it (their settings unknown).
* ``<set>.jsonl``: one row per example ``{index, prompt, generation, extracted, label, correct}``; rows are appended
  after every batch, and rewritten in index order once the set is complete.
* ``<set>.loss.json``: the response loss (a cache: a damaged one is recomputed, with a warning).
* ``summary.json``: per-set accuracy and n, the average over sets, model, adapter, settings, time.

Every JSON object written here (each row too) is sealed (:func:`lowbit.io.sealed`): a damaged file is an error
naming it (rows: the line), never a silently different number.

Resuming: a rerun reads the rows back (a truncated last line left by a crash is dropped), checks each stored prompt
against the dataset (a different file or prompt is an error, not a silent mix), and generates only the missing
indices; extraction and scoring are recomputed from the stored generations, so the summary depends on nothing else.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..data.prompts import format_prompt
from ..data.testsets import DatasetSpec, load_records, load_reference_records, resolve_datasets
from ..eval.answers import score_generation
from ..eval.config import EvalConfig
from ..eval.results import (
    append_rows,
    format_summary,  # noqa: F401  (the CLI prints summaries through this driver)
    make_row,
    read_rows,
    set_result,
    write_rows,
)
from ..io import DamagedFileError, atomic_write_json, read_json, recover_dir
from .eval_settings import SETTINGS, SUMMARY, check_settings, settings_key
from .loading import load_model, quantized_info, resolve_device_dtype, resolve_model

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")

#: ``generate_batches(prompts)`` yields ``(indices into prompts, continuations)`` per batch (see ``iter_generate``).
BatchGenerator = Callable[[list[str]], Iterable[tuple[list[int], list[str]]]]


@dataclass
class EvaluateRun:
    """One ``lowbit evaluate`` run: which model (and adapter) under which protocol (``eval``), and where.

    model: a model directory, hub id, lowbit quantized directory or alias (``tiny``). adapter: an adapter directory.
    out: results directory (default ``eval_out/<model>[+<adapter>]``). device: default cuda when available.
    dtype: ``auto`` (bfloat16 on cuda, float32 on cpu; quantized models keep their stored dtype).
    overwrite: discard earlier generations in ``out`` made with other settings. force_adapter: attach ``adapter``
    even when its recorded base fingerprint differs from ``model`` (by default that is an error)."""

    model: str
    eval: EvalConfig = field(default_factory=EvalConfig)
    adapter: str | None = None
    out: str | None = None
    device: str | None = None
    dtype: str = "auto"
    overwrite: bool = False
    force_adapter: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")


def default_out(model_path: str, adapter: str | None) -> Path:
    name = Path(model_path).name + (f"+{Path(adapter).name}" if adapter else "")
    return Path("eval_out") / name


@dataclass
class _Plan:
    """What one evaluation does, decided before the model loads: per set its records, prompts, stored rows, missing
    indices, and the response-loss records (with a stored result, if any)."""
    out: Path
    key: dict
    specs: list[DatasetSpec]
    records: dict[str, list[dict]]
    prompts: dict[str, list[str]] = field(default_factory=dict)
    stored: dict[str, dict[int, dict]] = field(default_factory=dict)
    missing: dict[str, list[int]] = field(default_factory=dict)
    loss_records: dict[str, list[dict]] = field(default_factory=dict)
    loss_done: dict[str, dict | None] = field(default_factory=dict)
    discard: list[Path] = field(default_factory=list)  # files of other settings, removed once the model loads
    steps: _BatchProgress | None = None  # the bar's view of the batch being generated (a model generator only)

    def needs_model(self) -> bool:
        return any(self.missing.values()) or any(v is None for v in self.loss_done.values())


class _BatchProgress:
    """Moves a set's bar while a batch generates (the model generator's ``on_step``, see
    :data:`lowbit.eval.generate.StepCallback`): by each example as it finishes, with the batch's generated tokens as
    the bar's postfix; the batch's other examples are counted when its rows are written (:meth:`batch_done`)."""

    def __init__(self) -> None:
        self.bar = None
        self.counted = 0  # examples of the current batch already on the bar
        self.shown = 0.0  # when the postfix was last redrawn

    def __call__(self, tokens: int, limit: int, finished: int) -> None:
        if self.bar is None:
            return
        if finished > self.counted:
            self.bar.update(finished - self.counted)
            self.counted = finished
        now = time.monotonic()
        if now - self.shown >= 0.5:  # one redraw per half second: the postfix changes every token
            self.bar.set_postfix_str(f"batch {tokens}/{limit} tokens")
            self.shown = now

    def batch_done(self, n: int) -> None:
        """The batch of ``n`` examples is written: the bar counts all of them."""
        if self.bar is not None:
            self.bar.update(n - self.counted)
        self.counted = 0


def run_evaluation(run: EvaluateRun, generate_batches: BatchGenerator | None = None) -> dict:
    """Evaluate ``run.model`` on ``run.eval.datasets``; write rows and ``summary.json`` under ``run.out``; return the
    summary. Every check (dataset names and files, model and adapter paths, output settings) runs before the model
    loads; the model loads only if some example is missing. ``generate_batches`` replaces the model (tests: an
    oracle)."""
    t_start = time.perf_counter()
    target = _resolve_target(run, oracle=generate_batches is not None)
    plan = _plan(run, target)
    model, tok = _load_model(run, target, plan, oracle=generate_batches is not None)
    if generate_batches is None and model is not None:
        plan.steps = _BatchProgress()
        generate_batches = _model_generator(model, tok, run.eval, plan.steps)
    generate = generate_batches
    _prepare_out(plan)
    summary = _new_summary(run, target)
    for s in plan.specs:
        summary["datasets"][s.name] = _evaluate_set(s, plan, run, generate, model, tok, summary)
        _finish_summary(summary, plan.out, t_start, complete=False, peak=None)
    peak = None
    if target["device"].startswith("cuda") and summary["generated"]:
        import torch

        peak = torch.cuda.max_memory_allocated() / 2**30
    return _finish_summary(summary, plan.out, t_start, complete=True, peak=peak)


def _resolve_target(run: EvaluateRun, oracle: bool) -> dict:
    """The model and adapter paths, device and dtype, and ``--out`` (checked to be no file)."""
    if oracle:
        model_path, quantized, device, dtype = run.model, False, "n/a", "n/a"
    else:
        model_path, quantized = resolve_model(run.model)
        device, dtype = resolve_device_dtype(run.device, run.dtype)
    adapter_path = None
    if run.adapter is not None:
        if not recover_dir(Path(run.adapter).expanduser()).is_dir():
            raise ValueError(f"--adapter {run.adapter!r} is not a directory; pass the adapter directory written by "
                             f"fine-tuning")
        adapter_path = str(Path(run.adapter).expanduser().resolve())
    out = Path(run.out) if run.out else default_out(model_path, adapter_path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is a file; choose a directory path")
    return {"model_path": model_path, "quantized": quantized, "device": device, "dtype": dtype,
            "adapter_path": adapter_path, "out": out, "oracle": oracle}


def _plan(run: EvaluateRun, target: dict) -> _Plan:
    """The sets, the output directory's settings check and what is already done there: rows whose prompt is the
    prompt used now, and stored response losses of the same settings."""
    cfg = run.eval
    specs = resolve_datasets(cfg.datasets, cfg.data_dir)
    # accuracy=False: nothing to generate, only the response loss.
    records = {s.name: load_records(s, cfg.limit, cfg.synthetic_seed) if cfg.accuracy else [] for s in specs}
    key = settings_key(cfg, target["model_path"], target["quantized"], target["adapter_path"], target["dtype"])
    out = target["out"]
    discard = check_settings(out, key, [s.name for s in specs], run.overwrite)
    plan = _Plan(out, key, specs, records, discard=discard)
    for s in specs:
        plan.prompts[s.name] = [format_prompt(r["instruction"], r.get("input", ""), cfg.prompt)
                                for r in records[s.name]]
        path = out / f"{s.name}.jsonl"
        plan.stored[s.name] = {} if path in discard else _stored_rows(path, plan.prompts[s.name])
        plan.missing[s.name] = [i for i in range(len(plan.prompts[s.name])) if i not in plan.stored[s.name]]
        log.info("%s: %d examples, %d done, %d to generate", s.name, len(plan.prompts[s.name]),
                 len(plan.prompts[s.name]) - len(plan.missing[s.name]), len(plan.missing[s.name]))
    if cfg.response_loss:
        plan.loss_records = {s.name: load_reference_records(s, cfg.loss_limit or cfg.limit, cfg.synthetic_seed)
                             for s in specs}
    plan.loss_done = {n: _stored_loss(out / f"{n}.loss.json", key, len(r)) for n, r in plan.loss_records.items()}
    return plan


def _stored_rows(path: Path, prompts: list[str]) -> dict[int, dict]:
    """The rows in ``path``; one generated from another prompt than today's is an error, not a silent mix."""
    rows = read_rows(path)
    for i, row in rows.items():
        if i < len(prompts) and row.get("prompt") != prompts[i]:
            raise ValueError(f"{path}: example {i} was generated from another prompt (the dataset file, "
                             f"--synthetic-seed or prompt changed); choose another --out or pass --overwrite")
    return rows


def _load_model(run: EvaluateRun, target: dict, plan: _Plan, oracle: bool):
    """The model and tokenizer, when something is left to generate or score; ``(None, None)`` otherwise."""
    if oracle and any(v is None for v in plan.loss_done.values()):
        raise ValueError("the response loss needs the model itself; it cannot be scored from a generator alone")
    if oracle or not plan.needs_model():
        return None, None
    import torch

    t0 = time.perf_counter()
    model, tok, loaded = load_model(target["model_path"], target["adapter_path"], target["device"], run.dtype,
                                    force_adapter=run.force_adapter)
    log.info("loaded %s%s in %.1fs (%s, %s)", target["model_path"],
             f" + adapter {target['adapter_path']}" if target["adapter_path"] else "", time.perf_counter() - t0,
             loaded["dtype"], loaded["device"])
    if target["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    return model, tok


def _model_generator(model, tok, cfg: EvalConfig, steps: _BatchProgress) -> BatchGenerator:
    """The model's :data:`BatchGenerator` under the protocol's decoding settings, reporting each step to
    ``steps``."""
    from ..eval.generate import iter_generate

    max_new_tokens, num_beams = cfg.generation
    return functools.partial(iter_generate, model, tok, max_new_tokens=max_new_tokens, batch_size=cfg.batch_size,
                             num_beams=num_beams, on_step=steps)


def _prepare_out(plan: _Plan) -> None:
    """The model (and adapter) loaded: only now touch the directory (stale files out, ``settings.json`` in)."""
    plan.out.mkdir(parents=True, exist_ok=True)
    for p in plan.discard:
        log.info("--overwrite: removing %s", p)
        p.unlink(missing_ok=True)
    if any(plan.missing.values()) or not (plan.out / SETTINGS).is_file():
        atomic_write_json(plan.out / SETTINGS, plan.key, seal=True)


def _new_summary(run: EvaluateRun, target: dict) -> dict:
    """The summary before any set: the model, its quantization, the settings."""
    cfg, dtype = run.eval, target["dtype"]
    info = {"quantized": target["quantized"], "quantization": None, "bits": None, "dtype": dtype,
            "device": target["device"]}
    if not target["oracle"]:
        info["bits"] = 32 if dtype == "float32" else 16
        if target["quantized"]:
            info.update(quantized_info(target["model_path"]), dtype="as stored")
    settings = {k: v for k, v in asdict(cfg).items() if k != "datasets"}
    settings.update(zip(("max_new_tokens", "num_beams"), cfg.generation), device=run.device, dtype=run.dtype,
                    prompt=cfg.prompt)
    return {"model": run.model, "model_path": target["model_path"], "adapter": target["adapter_path"], **info,
            "settings": settings, "datasets": {}, "average": None, "generated": 0, "generation_s": 0.0}


def _evaluate_set(s: DatasetSpec, plan: _Plan, run: EvaluateRun, generate: BatchGenerator | None, model, tok,
                  summary: dict) -> dict:
    """One set: the missing rows generated, every row re-scored, the response loss; -> its summary entry."""
    cfg, out = run.eval, plan.out
    if not cfg.accuracy:
        res = {"name": s.name, "display": s.display, "kind": s.kind, "accuracy": None, "correct": 0, "n": 0,
               "generated": 0, "file": None}
    else:
        res = _score_set(s, plan, run, generate, summary)
    if cfg.response_loss:
        res["response_loss"] = _response_loss(out / f"{s.name}.loss.json", plan.key, plan.loss_done[s.name], model,
                                              tok, plan.loss_records[s.name], cfg)
        log.info("%s: response loss %.4f (%d records, %d tokens)", s.name, res["response_loss"]["loss"],
                 res["response_loss"]["n"], res["response_loss"]["tokens"])
    return res


def _score_set(s: DatasetSpec, plan: _Plan, run: EvaluateRun, generate: BatchGenerator | None,
               summary: dict) -> dict:
    """Generate the set's missing rows, re-score all of them with today's labels and rule (so the file agrees with
    the summary) and rewrite the file in index order; -> the set's accuracy entry."""
    cfg, records, rows, missing = run.eval, plan.records[s.name], plan.stored[s.name], plan.missing[s.name]
    path = plan.out / f"{s.name}.jsonl"
    gen_s = _generate_missing(s, path, plan.prompts[s.name], records, rows, missing, generate, cfg, run.progress,
                              plan.steps)
    for i, row in rows.items():
        if i < len(records):
            row["label"] = str(records[i]["answer"])
        row["extracted"], row["correct"] = score_generation(row["generation"], row["label"], s.kind, cfg.choice_rule)
    write_rows(path, rows)
    res = set_result(s, [rows[i] for i in range(len(plan.prompts[s.name]))], cfg.choice_rule)
    res.update(generated=len(missing), file=f"{s.name}.jsonl")
    summary["generated"] += len(missing)
    summary["generation_s"] += gen_s
    log.info("%s: %.1f%% (%d/%d)", s.name, res["accuracy"], res["correct"], res["n"])
    return res


def _generate_missing(spec: DatasetSpec, path: Path, prompts: list[str], records: list[dict], rows: dict[int, dict],
                      missing: list[int], generate_batches: BatchGenerator, cfg: EvalConfig, progress: bool,
                      steps: _BatchProgress | None = None) -> float:
    """Generate the ``missing`` examples, appending each batch's rows to ``path``; -> seconds spent. The bar counts
    examples; ``steps`` (a model generator's) moves it within a batch."""
    if not missing:
        return 0.0
    from tqdm.auto import tqdm

    steps = steps or _BatchProgress()
    t0 = time.perf_counter()
    with tqdm(total=len(missing), desc=spec.name, unit="ex", disable=not progress) as bar:
        steps.bar = bar
        for idx, texts in generate_batches([prompts[i] for i in missing]):
            for j, text in zip(idx, texts):
                i = missing[j]
                rows[i] = make_row(i, prompts[i], text, str(records[i]["answer"]), spec.kind, cfg.choice_rule)
            append_rows(path, [rows[missing[j]] for j in idx])  # fsynced: a crash loses at most this batch
            steps.batch_done(len(idx))
        steps.bar = None
    got = [i for i in missing if i not in rows]
    if got:
        raise RuntimeError(f"{spec.name}: the generator returned no output for examples {got[:5]}")
    return time.perf_counter() - t0


def _stored_loss(path: Path, key: dict, n_records: int) -> dict | None:
    """A response-loss result stored by an earlier run with the same settings and records, else None (also when the
    file is damaged: it is a cache, recomputed)."""
    try:
        stored = read_json(path) if path.is_file() else None
    except DamagedFileError as e:
        log.warning("%s; recomputing the response loss", e.reason)
        return None
    ok = isinstance(stored, dict) and stored.get("settings") == key and stored.get("n_records") == n_records
    return stored if ok else None


def _response_loss(path: Path, key: dict, stored: dict | None, model, tok, records: list[dict],
                   cfg: EvalConfig) -> dict:
    """The set's response loss (computed, or ``stored``), written to ``path``; -> the summary entry."""
    from ..eval.response_loss import response_loss

    if stored is None:
        res = response_loss(model, tok, records, variant=cfg.prompt, batch_size=cfg.batch_size)
        stored = {"settings": key, "n_records": len(records), **res}
        atomic_write_json(path, stored, seal=True)
    return {k: stored[k] for k in ("loss", "record_mean", "ppl", "n", "tokens", "skipped")}


def _finish_summary(summary: dict, out: Path, t_start: float, complete: bool, peak: float | None) -> dict:
    import torch

    accs = [d["accuracy"] for d in summary["datasets"].values() if d["accuracy"] is not None]
    summary.update(
        average=sum(accs) / len(accs) if accs else None, complete=complete,
        examples_per_s=summary["generated"] / summary["generation_s"] if summary["generation_s"] else None,
        time_s=time.perf_counter() - t_start, eval_peak_memory_gb=peak, torch=torch.__version__,
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    from .. import __version__

    summary["lowbit"] = __version__
    atomic_write_json(out / SUMMARY, summary, seal=True)
    return summary
