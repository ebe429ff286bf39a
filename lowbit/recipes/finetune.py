"""``lowbit finetune RECIPE.yaml [key=value ...]``: quantize (if needed) -> initialise adapters -> train -> save.

Reads top to bottom: 1. run directory and the cheap checks (the checkpoint to resume, the training files, the
model's architecture from its config.json), 2. tokenizer and data (every error surfaces by here, before the model
is loaded), 3. base model, quantization and adapter initialisation, 4. the Hugging Face ``Trainer`` with lowbit's
callbacks, 5. the adapter, ``run.json`` and ``loss.png``. The run directory holds ``lowbit_run.json`` (its stamp,
:mod:`lowbit.rundir`: the recipe, and whether the run finished), ``config.yaml`` (resolved), ``log.jsonl`` (a
``step_loss`` record per optimizer step, the means every ``logging_steps``), ``checkpoint-*`` (adapter + optimizer
state only), ``adapter/`` (PEFT layout), ``loss.png`` and ``run.json`` (the summary, with the training set's files,
SHA-256 and record count, the base's fingerprint: weight hashes and quantization, and the loss: ``mean_train_loss``,
also under its old name ``final_loss``, and ``last_logged_loss``).

Checkpoints are committed by a ``COMPLETE`` marker written (atomically) after the Trainer has written every file
of the checkpoint, with their checksums; ``--resume`` continues from the newest complete checkpoint, so a process
killed mid-save never resumes from a half-written one, and a damaged checkpoint is an error naming the file; without
a complete checkpoint ``--resume`` is an error that changes nothing. A run killed before its first complete
checkpoint (a stamp or ``config.yaml``, but no checkpoint, ``adapter/`` or ``run.json``) holds nothing to keep: the
same command without ``--resume`` starts it over.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from pathlib import Path

import torch

from ..data.calibration import check_sources
from ..io import DamagedFileError, atomic_write_json, atomic_write_text
from ..rundir import DAMAGED, NEW, OTHER, STAMP, UNSTAMPED, RunDir, RunDirError
from .config import RecipeConfig, dump_recipe
from .loading import base_fingerprint, bits_and_method, check_architecture, read_model_config, resolve_model
from .trainer import (
    check_checkpoint,
    discard_incomplete_checkpoints,
    latest_checkpoint,
    plot_loss,
    read_log,
    trainer_classes,
    truncate_log,
)
from .training_data import load_training_records, training_files, training_set_record

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- model

def build_model(cfg: RecipeConfig, tokenizer, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Base model (quantized as configured) with adapters initialised; returns (model, adapter report)."""
    from ..adapters import INITS, apply_adapters
    from ..quant import QuantConfig, load_quantized, read_quant_meta
    from .loading import load_float_model
    from .quantize import calibration_windows

    acfg, quant, quantized_base = cfg.adapter, cfg.quant, None
    init = INITS[acfg.init]
    model_path = resolve_model(cfg.model.name)[0]
    if cfg.model.quantized:
        stored = QuantConfig.from_dict(read_quant_meta(cfg.model.quantized)["quantization"])
        if quant is not None and quant != stored:
            raise ValueError(f"model.quantized {cfg.model.quantized} was quantized with {stored.to_dict()}, but the "
                             f"recipe's quant section is {quant.to_dict()}; make them agree or set quant=null")
        if init.quantizes_base:
            raise ValueError(f"init {acfg.init!r} quantizes the base itself; unset model.quantized and set quant.*")
        qbase = load_quantized(cfg.model.quantized, device=device)
        if init.needs_float_weights:
            # The closed forms need W and H: the float model calibrates, the cached packed layers are reused.
            quant, quantized_base = stored, qbase
            model = load_float_model(model_path, cfg.model.dtype, device)
        else:
            model, quant = qbase, None
    else:
        # Quantized in the calibration loop: read one decoder layer at a time (the inits that quantize the base
        # themselves, and float fine-tuning, need the whole model).
        stream = quant is not None and not init.quantizes_base
        model = load_float_model(model_path, cfg.model.dtype, device, stream=stream)
    needs_calib = acfg.needs_calibration or (quant is not None and quant.needs_calibration)
    calib = calibration_windows(cfg.calibration, tokenizer)[0] if needs_calib else None
    report = apply_adapters(model, acfg, calib, quant=quant, quantized_base=quantized_base)
    return model, report


# ---------------------------------------------------------------------------------------------- the run directory

#: Training length may grow on resume; anything else changing would mix two different runs.
_MAY_CHANGE = ("max_steps", "epochs")


def _run_settings(recipe: dict) -> dict:
    """What makes two runs the same: the recipe without its output_dir (a moved run directory is the same run) and
    without the training length (:data:`_MAY_CHANGE`)."""
    d = {k: v for k, v in recipe.items() if k != "output_dir"}
    if isinstance(d.get("train"), dict):
        d["train"] = {k: v for k, v in d["train"].items() if k not in _MAY_CHANGE}
    return d


def _recorded_recipe(out: Path) -> dict | None:
    """The recipe a run directory written without a stamp (by an earlier lowbit) holds in ``config.yaml``."""
    import yaml

    saved = out / "config.yaml"
    if not saved.is_file():
        return None
    fix = "restore it, or start over in a new output_dir"
    try:
        old = yaml.safe_load(saved.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DamagedFileError(saved, f"{saved} is corrupt ({type(e).__name__})", fix) from None
    if not isinstance(old, dict):
        raise DamagedFileError(saved, f"{saved} is corrupt (not a recipe mapping)", fix)
    return {"settings": old, "complete": (out / "run.json").is_file()}


def run_dir(path: str | Path) -> RunDir:
    """A ``lowbit finetune`` output directory: its stamp holds the recipe (:func:`_run_settings`), unfinished from
    ``config.yaml`` on, finished once ``run.json`` is written."""
    return RunDir(path, "finetune", lambda old, new: _run_settings(old) == _run_settings(new),
                  what="fine-tuning run", recorded=_recorded_recipe, record="config.yaml")


def _interrupted_start(out: Path) -> bool:
    """A run directory whose run was killed before anything worth keeping: a stamp or ``config.yaml``, but no
    complete checkpoint, no ``adapter/`` and no ``run.json``."""
    return (((out / "config.yaml").is_file() or (out / STAMP).is_file()) and latest_checkpoint(out) is None
            and not (out / "adapter").exists() and not (out / "run.json").exists())


def _check_run_dir(out: Path, cfg: RecipeConfig, resume: bool) -> str:
    """Refuse a run directory that holds another run, or this run without ``resume``; restart a run killed before
    its first checkpoint. Returns the directory's state (:mod:`lowbit.rundir`)."""
    rd = run_dir(out)
    state = rd.state(cfg.to_dict())
    if state == NEW:
        return state
    if not resume and _interrupted_start(out):
        log.warning("%s holds a run killed before its first complete checkpoint; starting it over", out)
        discard_incomplete_checkpoints(out)
        (out / "log.jsonl").unlink(missing_ok=True)
        return NEW
    if not resume:
        raise RunDirError(out, state, f"output_dir {out} already holds a run; pass --resume to continue it, or "
                                      f"choose another output_dir=...")
    if state == UNSTAMPED and latest_checkpoint(out) is None:
        return state  # nothing to resume: reported next, changing nothing
    if state == UNSTAMPED:
        raise RunDirError(out, state, f"--resume: {out / 'config.yaml'} is missing, so the run's settings cannot "
                                      f"be checked against the recipe; restore it, or start over in a new output_dir")
    if state == DAMAGED:
        raise RunDirError(out, state, f"--resume: {rd.damage.reason}; {rd.damage.fix}")
    if state == OTHER:
        old, new = _run_settings(rd.found["settings"]), _run_settings(cfg.to_dict())
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != json.loads(json.dumps(new.get(k))))
        saved = rd.stamp_path if rd.stamp_path.is_file() else out / "config.yaml"
        raise RunDirError(out, state, f"--resume: the recipe differs from the run in {out} ({saved.name}) in {diff}; "
                                      f"resume with the same settings (only train.max_steps/epochs may change) or "
                                      f"use a new output_dir")
    return state


def precision_flags(precision: str, device: torch.device) -> dict:
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            precision = "bf16"
        else:
            precision = "fp32"
    if precision in ("bf16", "fp16") and device.type != "cuda" and precision == "fp16":
        raise ValueError("fp16 autocast needs CUDA; use precision=bf16 or fp32 on CPU")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


# ---------------------------------------------------------------------------------------------- the recipe

def finetune(cfg: RecipeConfig, resume: bool = False, callbacks: list | None = None) -> dict:
    """Run the recipe; returns the ``run.json`` summary (empty on non-zero ranks). ``callbacks``: extra
    ``transformers.TrainerCallback`` objects (early stopping, custom logging ...)."""
    out = Path(cfg.output_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        # Rank 0 alone: the others would see the stamp it writes below and call the run an old one.
        _check_run_dir(out, cfg, resume)
    ckpt = _resume_checkpoint(out) if resume else None
    data_files = _check_inputs(cfg)
    device = pick_device(cfg)
    tokenizer, records, train_ds = _load_data(cfg)
    _start_run_dir(cfg, out)
    args = _training_args(cfg, out, device)
    model, report, init_time = _build_model_timed(cfg, tokenizer, device)
    trainer = _build_trainer(cfg, out, model, args, train_ds, tokenizer, ckpt, callbacks)
    result, train_time = _train(trainer, ckpt, device)
    model.config.use_cache = True  # generation needs the KV cache that training switched off
    if not trainer.is_world_process_zero():
        return {}
    base_dir = save_model(cfg, model, tokenizer, out)
    summary = _summary(cfg, out, report, result, ckpt, device, base_dir, data_files, records,
                       {"train_time_s": train_time, "init_time_s": init_time})
    _save_summary(cfg, out, summary)
    if cfg.eval is not None:
        summary["eval"] = evaluate_run(cfg, out, base_dir)
    return summary


def _check_inputs(cfg: RecipeConfig) -> list:
    """Cheap checks before anything is written or loaded: the training files, the quantized base's small files,
    the architecture (from config.json alone). Returns the training files."""
    data_files = training_files(cfg.data)
    check_sources(cfg.calibration.sources)  # a bad calibration file must not surface after the model loads
    loaded = cfg.model.quantized or cfg.model.name
    if cfg.model.quantized:  # its config and tokenizer are read next: their checksums first (the weights on load)
        from ..quant import verify_quantized

        verify_quantized(cfg.model.quantized, weights=False)
    check_architecture(read_model_config(loaded), loaded)
    return data_files


def pick_device(cfg: RecipeConfig) -> torch.device:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def recipe_tokenizer(cfg: RecipeConfig):
    """The tokenizer of the recipe's model (its quantized directory when given), padding with EOS where it has no
    pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.quantized or resolve_model(cfg.model.name)[0])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_data(cfg: RecipeConfig):
    """Tokenizer, training records and the tokenized set; every data error surfaces here, before the model loads
    (the eval sets' files too: a missing one must not surface only after training)."""
    from ..data.tokenize import tokenize_dataset

    tokenizer = recipe_tokenizer(cfg)
    records = load_training_records(cfg)
    train_ds = tokenize_dataset(records, tokenizer, cfg.data.max_length, variant=cfg.data.prompt,
                                train_on_prompt=cfg.data.train_on_prompt)
    log.info("training data: %d examples (%s)", len(train_ds), cfg.data.source)
    if cfg.eval is not None:
        from ..data.testsets import resolve_datasets

        resolve_datasets(list(cfg.eval.datasets), cfg.eval.data_dir)
    return tokenizer, records, train_ds


def _start_run_dir(cfg: RecipeConfig, out: Path) -> None:
    """The first writes: the stamp (unfinished) and the resolved recipe, ``config.yaml``."""
    out.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        run_dir(out).write_stamp(cfg.to_dict(), complete=False)
        atomic_write_text(out / "config.yaml", dump_recipe(cfg))


def _training_args(cfg: RecipeConfig, out: Path, device: torch.device):
    """The Trainer's arguments, validated here, before the expensive model work."""
    from transformers import TrainingArguments

    t, world = cfg.train, int(os.environ.get("WORLD_SIZE", "1"))
    return TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr, weight_decay=t.weight_decay, lr_scheduler_type=t.schedule,
        warmup_steps=t.warmup_steps or t.warmup_ratio, num_train_epochs=t.epochs, max_steps=t.max_steps,
        max_grad_norm=t.max_grad_norm, optim=t.optim, logging_steps=t.logging_steps, save_strategy="steps",
        save_steps=t.save_steps, save_total_limit=t.save_total_limit, seed=t.seed, data_seed=t.seed, report_to=[],
        remove_unused_columns=False, dataloader_num_workers=0, use_cpu=device.type == "cpu",
        ddp_backend="gloo" if (world > 1 and device.type == "cpu") else None, disable_tqdm=False,
        **precision_flags(t.precision, device))


def _build_model_timed(cfg: RecipeConfig, tokenizer, device: torch.device):
    """:func:`build_model`, made ready for training; -> (model, adapter report, seconds)."""
    torch.manual_seed(cfg.train.seed)
    t0 = time.perf_counter()
    model, report = build_model(cfg, tokenizer, device)
    init_time = time.perf_counter() - t0
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    return model, report, init_time


def _build_trainer(cfg: RecipeConfig, out: Path, model, args, train_ds, tokenizer, ckpt: Path | None,
                   callbacks: list | None):
    """The Hugging Face Trainer with lowbit's callbacks (adapter-only checkpoints, the JSONL log); on resume the
    log loses the steps after the checkpoint, and unfinished checkpoints are discarded."""
    from ..data.tokenize import CausalLMCollator

    AdapterTrainer, CommitCheckpoint, JsonlLogger = trainer_classes()
    trainer = AdapterTrainer(model=model, args=args, train_dataset=train_ds,
                             data_collator=CausalLMCollator(tokenizer),
                             callbacks=[CommitCheckpoint(), JsonlLogger(out / "log.jsonl"), *(callbacks or [])])
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and ckpt is not None:
        truncate_log(out / "log.jsonl", int(ckpt.name.split("-")[-1]))
        discard_incomplete_checkpoints(out)
    return trainer


def _train(trainer, ckpt: Path | None, device: torch.device):
    """-> (the Trainer's result, seconds)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    return result, time.perf_counter() - t0


def save_model(cfg: RecipeConfig, model, tokenizer, out: Path) -> str:
    """The base (:func:`_save_base`) and the adapter (``adapter/``); -> the base's path."""
    from ..adapters import save_adapter

    base_dir = _save_base(cfg, model, tokenizer, out)
    save_adapter(model, out / "adapter", extra={"base": base_dir})
    return base_dir


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_max_rss"


def _summary(cfg: RecipeConfig, out: Path, report: dict, result, ckpt: Path | None, device: torch.device,
             base_dir: str, data_files: list, records: list, times: dict) -> dict:
    """The ``run.json`` summary. ``final_loss`` is the mean training loss over the run (the Trainer's
    ``training_loss``; kept under its old name), also ``mean_train_loss``; ``last_logged_loss`` / ``last_step_loss``:
    the last logged mean and the last step's loss in ``log.jsonl`` (``None`` when there is none)."""
    peak, peak_kind = _peak_memory(device)
    logs = list(reversed(read_log(out / "log.jsonl")))
    return {
        "method": cfg.method or f"{cfg.adapter.adapter}-{cfg.adapter.init}",
        **bits_and_method(cfg),
        "adapter": cfg.adapter.adapter, "init": cfg.adapter.init,
        "trainable_params": report["trainable"], "trainable_percent": report["percent"],
        "base_params": report["base_params"], "steps": result.global_step,
        "final_loss": float(result.training_loss), "mean_train_loss": float(result.training_loss),
        "last_logged_loss": next((float(r["loss"]) for r in logs if r.get("loss") is not None), None), **times,
        "last_step_loss": next((float(r["step_loss"]) for r in logs if r.get("step_loss") is not None), None),
        "peak_memory_gb": peak, "peak_memory_kind": peak_kind, "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "resumed_from": ckpt.name if ckpt else None, "device": str(device), "base": base_dir,
        "base_fingerprint": base_fingerprint(cfg),
        "training_set": training_set_record(cfg.data, data_files, records),
    }


def _save_summary(cfg: RecipeConfig, out: Path, summary: dict) -> None:
    """``run.json``, the loss plot, and the stamp marked finished."""
    atomic_write_json(out / "run.json", summary, seal=True)
    plot_loss(out / "log.jsonl", out / "loss.png", title=f"{summary['method']} ({summary['bits']}-bit)")
    run_dir(out).finish(cfg.to_dict())
    log.info("run done: %d steps, mean loss %.4f, last logged loss %s, %.1fs -> %s", summary["steps"],
             summary["mean_train_loss"], summary["last_logged_loss"], summary["train_time_s"], out)


def _resume_checkpoint(out: Path) -> Path:
    """The newest complete checkpoint to resume from, its files checked against their checksums; without one, or
    with a damaged one, an error that leaves the directory as it is."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        state = "holds no complete checkpoint (checkpoint-*/COMPLETE)" if out.is_dir() else "does not exist"
        raise ValueError(f"--resume: output_dir {out} {state}, so there is nothing to resume; nothing was changed. "
                         f"Start over without --resume in a new output_dir (or after deleting {out})")
    check_checkpoint(ckpt)
    return ckpt


def _save_base(cfg: RecipeConfig, model, tokenizer, out: Path) -> str:
    """The base the adapter was trained on: a quantized base is saved to ``RUN/base`` (LoftQ and ApiQ-bw change
    the quantized weights, and no other copy exists); a float base is named by its path or hub id."""
    if cfg.model.quantized:
        return str(Path(cfg.model.quantized).resolve())
    if cfg.quant is None:
        return resolve_model(cfg.model.name)[0]
    from ..adapters import without_adapters
    from ..quant import save_quantized

    with without_adapters(model) as base:
        save_quantized(base, out / "base", cfg.quant, tokenizer=tokenizer, source=cfg.model.name,
                       extra={"adapter_init": cfg.adapter.init}, progress=True)
    return str((out / "base").resolve())


def evaluate_run(cfg: RecipeConfig, out: Path, base_dir: str) -> dict:
    """``lowbit evaluate`` of the trained adapter under ``cfg.eval``; results land in the run directory
    (``<set>.jsonl`` and ``summary.json``, read by ``lowbit compare``)."""
    from .evaluate import EvaluateRun, run_evaluation

    return run_evaluation(EvaluateRun(model=base_dir, eval=cfg.eval, adapter=str(out / "adapter"), out=str(out)))
