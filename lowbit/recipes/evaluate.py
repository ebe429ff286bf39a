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

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..data.prompts import format_prompt
from ..data.testsets import DatasetSpec, known_datasets, load_records, load_reference_records, resolve_datasets
from ..eval.answers import score_generation
from ..eval.config import EvalConfig
from ..eval.results import append_rows, make_row, read_rows, set_result, write_rows
from ..io import DamagedFileError, atomic_write_json, read_json, recover_dir
from .loading import load_model, quantized_info, resolve_device_dtype, resolve_model

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
SETTINGS, SUMMARY = "settings.json", "summary.json"

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


# ------------------------------------------------------------------------------------------------------ model

def _fingerprint(path: str | None) -> str | None:
    """A cheap identity of a directory's weight files: a retrained adapter or re-quantized model in the same place
    must not be mixed with the generations of the old one. Their SHA-256 recorded by lowbit (quantized models,
    adapters: the same content rewritten, as by a resumed run, keeps its identity), else names, sizes and mtimes."""
    if path is None or not Path(path).is_dir():
        return None
    suffixes, h = (".safetensors", ".bin", ".pt", ".pth"), hashlib.sha256()
    metas = [Path(path) / m for m in ("quant_config.json", "lowbit_adapter.json") if (Path(path) / m).is_file()]
    recorded = (read_json(metas[0]).get("files") or {}) if metas else {}
    if recorded:
        h.update("".join(f"{n}:{d.get('sha256')};" for n, d in sorted(recorded.items()) if n.endswith(suffixes)
                         and isinstance(d, dict)).encode())
        return h.hexdigest()[:16]
    for f in sorted(f for f in Path(path).iterdir() if f.suffix in suffixes):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- the run

def _settings_key(cfg: EvalConfig, model_path: str, quantized: bool, adapter_path: str | None, dtype: str) -> dict:
    max_new_tokens, num_beams = cfg.generation
    return {"model": model_path, "model_fingerprint": _fingerprint(model_path), "adapter": adapter_path,
            "adapter_fingerprint": _fingerprint(adapter_path), "prompt": cfg.prompt, "num_beams": num_beams,
            "max_new_tokens": max_new_tokens, "dtype": "as stored" if quantized else dtype}


def _check_settings(out: Path, key: dict, dataset_names: list[str], overwrite: bool) -> list[Path]:
    """Refuse an ``--out`` holding generations made with other settings (unless ``overwrite``); -> the result files
    to discard. Nothing is deleted or written here, so a run that fails later (a bad adapter) changes nothing."""
    f = out / SETTINGS
    try:
        old = read_json(f, "pass --overwrite to discard the generations there") if f.is_file() else None
    except ValueError:
        if not overwrite:
            raise
        old = {}  # damaged: the settings there are unknown, every set there is stale
    rows = [out / f"{n}.jsonl" for n in dataset_names if (out / f"{n}.jsonl").is_file()]
    if not isinstance(old, dict) and rows and not overwrite:
        raise ValueError(f"{f} is missing or corrupt, so the settings that generated {rows[0]} are unknown; pass "
                         f"--overwrite to discard those rows (or choose another --out)")
    old = old if isinstance(old, dict) else ({} if f.is_file() else None)
    diff = [k for k in key if old is not None and old.get(k) != key[k]]
    if diff and not overwrite:
        what = ", ".join(f"{k} {old.get(k)!r} there, {key[k]!r} now" for k in diff)
        raise ValueError(f"--out {out} holds generations made with other settings ({what}); choose another "
                         f"--out, or pass --overwrite to discard them")
    if not overwrite:
        return []
    names = known_datasets() if diff else dataset_names  # other settings: every set there is stale
    # Only our own files: --out may be a fine-tuning run directory.
    return [p for p in [out / f"{n}.jsonl" for n in names] + [out / SUMMARY] if p.exists()]


def default_out(model_path: str, adapter: str | None) -> Path:
    name = Path(model_path).name + (f"+{Path(adapter).name}" if adapter else "")
    return Path("eval_out") / name


def run_evaluation(run: EvaluateRun, generate_batches: BatchGenerator | None = None) -> dict:
    """Evaluate ``run.model`` on ``run.eval.datasets``; write rows and ``summary.json`` under ``run.out``; return the
    summary. Every check (dataset names and files, model and adapter paths, output settings) runs before the model
    loads; the model loads only if some example is missing. ``generate_batches`` replaces the model (tests: an
    oracle)."""
    t_start = time.perf_counter()
    cfg = run.eval
    specs = resolve_datasets(cfg.datasets, cfg.data_dir)
    # accuracy=False: nothing to generate, only the response loss below.
    records = {s.name: load_records(s, cfg.limit, cfg.synthetic_seed) if cfg.accuracy else [] for s in specs}
    if generate_batches is None:
        model_path, quantized = resolve_model(run.model)
        device, dtype = resolve_device_dtype(run.device, run.dtype)
    else:
        model_path, quantized, device, dtype = run.model, False, "n/a", "n/a"
    adapter_path = None
    if run.adapter is not None:
        if not recover_dir(Path(run.adapter).expanduser()).is_dir():
            raise ValueError(f"--adapter {run.adapter!r} is not a directory; pass the adapter directory written by "
                             f"fine-tuning")
        adapter_path = str(Path(run.adapter).expanduser().resolve())
    out = Path(run.out) if run.out else default_out(model_path, adapter_path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is a file; choose a directory path")
    key = _settings_key(cfg, model_path, quantized, adapter_path, dtype)
    discard = _check_settings(out, key, [s.name for s in specs], run.overwrite)

    # What is already done: rows on disk whose prompt is the prompt we would use now.
    prompts, stored, missing = {}, {}, {}
    for s in specs:
        prompts[s.name] = [format_prompt(r["instruction"], r.get("input", ""), cfg.prompt) for r in records[s.name]]
        path = out / f"{s.name}.jsonl"
        stored[s.name] = {} if path in discard else read_rows(path)
        for i, row in stored[s.name].items():
            if i < len(prompts[s.name]) and row.get("prompt") != prompts[s.name][i]:
                raise ValueError(f"{out / (s.name + '.jsonl')}: example {i} was generated from another prompt "
                                 f"(the dataset file, --synthetic-seed or prompt changed); choose another --out "
                                 f"or pass --overwrite")
        missing[s.name] = [i for i in range(len(prompts[s.name])) if i not in stored[s.name]]
        log.info("%s: %d examples, %d done, %d to generate", s.name, len(prompts[s.name]),
                 len(prompts[s.name]) - len(missing[s.name]), len(missing[s.name]))

    info = {"quantized": quantized, "quantization": None, "bits": None, "dtype": dtype, "device": device}
    if generate_batches is None:
        info["bits"] = 32 if dtype == "float32" else 16
        if quantized:
            info.update(quantized_info(model_path), dtype="as stored")
    peak = None
    loss_records = {s.name: load_reference_records(s, cfg.loss_limit or cfg.limit, cfg.synthetic_seed)
                    for s in specs} if cfg.response_loss else {}
    loss_done = {n: _stored_loss(out / f"{n}.loss.json", key, len(r)) for n, r in loss_records.items()}
    need_model = any(missing.values()) or any(v is None for v in loss_done.values())
    if generate_batches is not None and any(v is None for v in loss_done.values()):
        raise ValueError("the response loss needs the model itself; it cannot be scored from a generator alone")
    model = tok = None
    if generate_batches is None and need_model:
        import torch

        from ..eval.generate import iter_generate

        t0 = time.perf_counter()
        model, tok, loaded = load_model(model_path, adapter_path, device, run.dtype, force_adapter=run.force_adapter)
        log.info("loaded %s%s in %.1fs (%s, %s)", model_path, f" + adapter {adapter_path}" if adapter_path else "",
                 time.perf_counter() - t0, loaded["dtype"], loaded["device"])
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()

        max_new_tokens, num_beams = cfg.generation

        def generate_batches(batch_prompts):
            return iter_generate(model, tok, batch_prompts, max_new_tokens=max_new_tokens,
                                 batch_size=cfg.batch_size, num_beams=num_beams)

    # The model (and adapter) loaded: only now touch the directory.
    out.mkdir(parents=True, exist_ok=True)
    for p in discard:
        log.info("--overwrite: removing %s", p)
        p.unlink()
    if any(missing.values()) or not (out / SETTINGS).is_file():
        atomic_write_json(out / SETTINGS, key, seal=True)
    settings = {k: v for k, v in asdict(cfg).items() if k != "datasets"}
    settings.update(zip(("max_new_tokens", "num_beams"), cfg.generation), device=run.device, dtype=run.dtype,
                    prompt=cfg.prompt)
    summary = {"model": run.model, "model_path": model_path, "adapter": adapter_path, **info, "settings": settings,
               "datasets": {}, "average": None, "generated": 0, "generation_s": 0.0}
    for s in specs:
        if not cfg.accuracy:
            res = summary["datasets"][s.name] = {"name": s.name, "display": s.display, "kind": s.kind,
                                                 "accuracy": None, "correct": 0, "n": 0, "generated": 0, "file": None}
            res["response_loss"] = _response_loss(out / f"{s.name}.loss.json", key, loss_done[s.name], model, tok,
                                                  loss_records[s.name], cfg)
            log.info("%s: response loss %.4f (%d records)", s.name, res["response_loss"]["loss"],
                     res["response_loss"]["n"])
            _finish_summary(summary, out, t_start, complete=False, peak=peak)
            continue
        gen_s = _generate_missing(s, out / f"{s.name}.jsonl", prompts[s.name], records[s.name], stored[s.name],
                                  missing[s.name], generate_batches, cfg, run.progress)
        rows = stored[s.name]
        for i, row in rows.items():  # re-score with today's labels and rule, so the file agrees with the summary
            if i < len(records[s.name]):
                row["label"] = str(records[s.name][i]["answer"])
            row["extracted"], row["correct"] = score_generation(row["generation"], row["label"], s.kind,
                                                                cfg.choice_rule)
        write_rows(out / f"{s.name}.jsonl", rows)
        res = set_result(s, [rows[i] for i in range(len(prompts[s.name]))], cfg.choice_rule)
        res.update(generated=len(missing[s.name]), file=f"{s.name}.jsonl")
        summary["datasets"][s.name] = res
        summary["generated"] += len(missing[s.name])
        summary["generation_s"] += gen_s
        log.info("%s: %.1f%% (%d/%d)", s.name, res["accuracy"], res["correct"], res["n"])
        if cfg.response_loss:
            res["response_loss"] = _response_loss(out / f"{s.name}.loss.json", key, loss_done[s.name], model, tok,
                                                  loss_records[s.name], cfg)
            log.info("%s: response loss %.4f (%d records, %d tokens)", s.name, res["response_loss"]["loss"],
                     res["response_loss"]["n"], res["response_loss"]["tokens"])
        _finish_summary(summary, out, t_start, complete=False, peak=peak)
    if device.startswith("cuda") and summary["generated"]:
        import torch

        peak = torch.cuda.max_memory_allocated() / 2**30
    return _finish_summary(summary, out, t_start, complete=True, peak=peak)


def _generate_missing(spec: DatasetSpec, path: Path, prompts: list[str], records: list[dict], rows: dict[int, dict],
                      missing: list[int], generate_batches: BatchGenerator, cfg: EvalConfig, progress: bool) -> float:
    """Generate the ``missing`` examples, appending each batch's rows to ``path``; -> seconds spent."""
    if not missing:
        return 0.0
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    with tqdm(total=len(missing), desc=spec.name, unit="ex", disable=not progress) as bar:
        for idx, texts in generate_batches([prompts[i] for i in missing]):
            for j, text in zip(idx, texts):
                i = missing[j]
                rows[i] = make_row(i, prompts[i], text, str(records[i]["answer"]), spec.kind, cfg.choice_rule)
            append_rows(path, [rows[missing[j]] for j in idx])  # fsynced: a crash loses at most this batch
            bar.update(len(idx))
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
