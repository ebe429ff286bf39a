"""``lowbit finetune RECIPE.yaml [key=value ...]``: quantize (if needed) -> initialise adapters -> train -> save.

Reads top to bottom: 1. config, run directory and the cheap checks (the checkpoint to resume, the training files,
the model's architecture from its config.json), 2. tokenizer and data (every error surfaces by here, before the
model is loaded), 3. base model, quantization and adapter initialisation, 4. the Hugging Face ``Trainer`` with
lowbit's callbacks, 5. the adapter, ``run.json`` and ``loss.png``. The run directory holds ``config.yaml``
(resolved), ``log.jsonl`` (one JSON object per logging step), ``checkpoint-*`` (adapter + optimizer state only),
``adapter/`` (PEFT layout), ``loss.png`` and ``run.json`` (the summary, with the training set's files, SHA-256
and record count, and the base's fingerprint: weight hashes and quantization).

Checkpoints are committed by a ``COMPLETE`` marker written (atomically) after the Trainer has written every file
of the checkpoint, with their checksums; ``--resume`` continues from the newest complete checkpoint, so a process
killed mid-save never resumes from a half-written one, and a damaged checkpoint is an error naming the file; without
a complete checkpoint ``--resume`` is an error that changes nothing. A run killed before its first complete
checkpoint (``config.yaml`` but no checkpoint, ``adapter/`` or ``run.json``) holds nothing to keep: the same command
without ``--resume`` starts it over.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from pathlib import Path

import torch

from ..io import atomic_write_json, atomic_write_text
from .config import RecipeConfig, dump_recipe
from .loading import check_architecture, model_dir_fingerprint, read_model_config, resolve_model
from .trainer import (
    check_checkpoint,
    discard_incomplete_checkpoints,
    latest_checkpoint,
    plot_loss,
    trainer_classes,
    truncate_log,
)
from .training_data import load_training_records, training_files, training_set_record

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- model

def build_model(cfg: RecipeConfig, tokenizer, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Base model (quantized as configured) with adapters initialised; returns (model, adapter report)."""
    from transformers import AutoModelForCausalLM

    from ..adapters import INITS, apply_adapters
    from ..quant import QuantConfig, load_quantized, read_quant_meta
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
            # The closed forms need W and H: the float model runs the calibration pass, the cached packed
            # layers are reused as they are.
            quant, quantized_base = stored, qbase
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, cfg.model.dtype))
            model.to(device)
        else:
            model, quant = qbase, None
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, cfg.model.dtype))
        model.to(device)
    needs_calib = acfg.needs_calibration or (quant is not None and quant.needs_calibration)
    calib = calibration_windows(cfg.calibration, tokenizer)[0] if needs_calib else None
    report = apply_adapters(model, acfg, calib, quant=quant, quantized_base=quantized_base)
    return model, report


# ---------------------------------------------------------------------------------------------- the recipe

def _interrupted_start(out: Path) -> bool:
    """A run directory whose run was killed before anything worth keeping: ``config.yaml``, but no complete
    checkpoint, no ``adapter/`` and no ``run.json``."""
    return ((out / "config.yaml").is_file() and latest_checkpoint(out) is None and not (out / "adapter").exists()
            and not (out / "run.json").exists())


def _check_run_dir(out: Path, cfg: RecipeConfig, resume: bool) -> None:
    saved = out / "config.yaml"
    if not out.exists() or not any(out.iterdir()):
        return
    if not resume and _interrupted_start(out):
        log.warning("%s holds a run killed before its first complete checkpoint; starting it over", out)
        discard_incomplete_checkpoints(out)
        (out / "log.jsonl").unlink(missing_ok=True)
        return
    if not resume:
        raise ValueError(f"output_dir {out} already holds a run; pass --resume to continue it, or choose another "
                         f"output_dir=...")
    if not saved.is_file():
        if latest_checkpoint(out) is None:
            return  # nothing to resume: reported next, changing nothing
        raise ValueError(f"--resume: {saved} is missing, so the run's settings cannot be checked against the "
                         f"recipe; restore it, or start over in a new output_dir")
    import yaml

    try:
        old = yaml.safe_load(saved.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"--resume: {saved} is corrupt ({type(e).__name__}); restore it, or start over in a new "
                         f"output_dir") from None
    if not isinstance(old, dict):
        raise ValueError(f"--resume: {saved} is corrupt (not a recipe mapping); restore it, or start over in a "
                         f"new output_dir")
    new = cfg.to_dict()
    # Training length may grow on resume; anything else changing would mix two different runs.
    for d in (old, new):
        if isinstance(d.get("train"), dict):
            d["train"].pop("max_steps", None)
            d["train"].pop("epochs", None)
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ValueError(f"--resume: the recipe differs from the run in {out} ({saved.name}) in {diff}; resume "
                         f"with the same settings (only train.max_steps/epochs may change) or use a new "
                         f"output_dir")


def precision_flags(precision: str, device: torch.device) -> dict:
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            precision = "bf16"
        else:
            precision = "fp32"
    if precision in ("bf16", "fp16") and device.type != "cuda" and precision == "fp16":
        raise ValueError("fp16 autocast needs CUDA; use precision=bf16 or fp32 on CPU")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def finetune(cfg: RecipeConfig, resume: bool = False, callbacks: list | None = None) -> dict:
    """Run the recipe; returns the ``run.json`` summary (empty on non-zero ranks). ``callbacks``: extra
    ``transformers.TrainerCallback`` objects (early stopping, custom logging ...)."""
    from ..data.tokenize import CausalLMCollator, tokenize_dataset

    out = Path(cfg.output_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if int(os.environ.get("RANK", "0")) == 0:
        # Rank 0 alone: the others would see the config.yaml it writes below and call the run an old one.
        _check_run_dir(out, cfg, resume)
    # 1b. Cheap checks before anything is written or loaded: the checkpoint to resume, the training files, the
    # architecture (from config.json alone).
    ckpt = _resume_checkpoint(out) if resume else None
    data_files = training_files(cfg.data)
    loaded = cfg.model.quantized or cfg.model.name
    if cfg.model.quantized:  # its config and tokenizer are read next: their checksums first (the weights on load)
        from ..quant import verify_quantized

        verify_quantized(cfg.model.quantized, weights=False)
    check_architecture(read_model_config(loaded), loaded)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    flags = precision_flags(cfg.train.precision, device)

    # 2. Tokenizer and data: fail here, before the model is loaded.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.quantized or resolve_model(cfg.model.name)[0])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    records = load_training_records(cfg)
    train_ds = tokenize_dataset(records, tokenizer, cfg.data.max_length, variant=cfg.data.prompt,
                                train_on_prompt=cfg.data.train_on_prompt)
    log.info("training data: %d examples (%s)", len(train_ds), cfg.data.source)
    if cfg.eval is not None:  # a missing test file must not surface only after training
        from ..data.testsets import resolve_datasets

        resolve_datasets(list(cfg.eval.datasets), cfg.eval.data_dir)

    out.mkdir(parents=True, exist_ok=True)
    if local_rank == 0:
        atomic_write_text(out / "config.yaml", dump_recipe(cfg))

    # The Trainer's arguments are validated here, before the expensive model work.
    from transformers import TrainingArguments

    AdapterTrainer, CommitCheckpoint, JsonlLogger = trainer_classes()
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=cfg.train.batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum, learning_rate=cfg.train.lr,
        weight_decay=cfg.train.weight_decay, lr_scheduler_type=cfg.train.schedule,
        warmup_steps=cfg.train.warmup_steps or cfg.train.warmup_ratio, num_train_epochs=cfg.train.epochs,
        max_steps=cfg.train.max_steps, max_grad_norm=cfg.train.max_grad_norm, optim=cfg.train.optim,
        logging_steps=cfg.train.logging_steps, save_strategy="steps", save_steps=cfg.train.save_steps,
        save_total_limit=cfg.train.save_total_limit, seed=cfg.train.seed, data_seed=cfg.train.seed,
        report_to=[], remove_unused_columns=False, dataloader_num_workers=0, use_cpu=device.type == "cpu",
        ddp_backend="gloo" if (world > 1 and device.type == "cpu") else None, disable_tqdm=False,
        **flags)

    # 3. Model, quantization, adapters.
    torch.manual_seed(cfg.train.seed)
    t0 = time.perf_counter()
    model, report = build_model(cfg, tokenizer, device)
    init_time = time.perf_counter() - t0
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False

    # 4. The Trainer, customised with callbacks (and adapter-only checkpoints).
    trainer = AdapterTrainer(model=model, args=args, train_dataset=train_ds,
                             data_collator=CausalLMCollator(tokenizer),
                             callbacks=[CommitCheckpoint(), JsonlLogger(out / "log.jsonl"), *(callbacks or [])])
    if local_rank == 0 and ckpt is not None:
        truncate_log(out / "log.jsonl", int(ckpt.name.split("-")[-1]))
        discard_incomplete_checkpoints(out)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t1 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    train_time = time.perf_counter() - t1

    # 5. Save (generation needs the KV cache that training switched off).
    model.config.use_cache = True
    summary = {}
    if trainer.is_world_process_zero():
        from ..adapters import save_adapter

        base_dir = _save_base(cfg, model, tokenizer, out)
        save_adapter(model, out / "adapter", extra={"base": base_dir})
        if device.type == "cuda":
            peak, peak_kind = torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
        else:
            peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_max_rss"
        summary = {
            "method": cfg.method or f"{cfg.adapter.adapter}-{cfg.adapter.init}",
            **_bits_and_method(cfg),
            "adapter": cfg.adapter.adapter, "init": cfg.adapter.init,
            "trainable_params": report["trainable"], "trainable_percent": report["percent"],
            "base_params": report["base_params"], "steps": result.global_step,
            "final_loss": float(result.training_loss), "train_time_s": train_time, "init_time_s": init_time,
            "peak_memory_gb": peak, "peak_memory_kind": peak_kind, "world_size": world,
            "resumed_from": ckpt.name if ckpt else None, "device": str(device), "base": base_dir,
            "base_fingerprint": _base_fingerprint(cfg),
            "training_set": training_set_record(cfg.data, data_files, records),
        }
        atomic_write_json(out / "run.json", summary, seal=True)
        plot_loss(out / "log.jsonl", out / "loss.png", title=f"{summary['method']} ({summary['bits']}-bit)")
        log.info("run done: %d steps, final loss %.4f, %.1fs -> %s", result.global_step, result.training_loss,
                 train_time, out)
        if cfg.eval is not None:
            summary["eval"] = evaluate_run(cfg, out, base_dir)
    return summary


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


def _base_fingerprint(cfg: RecipeConfig) -> dict:
    """The base the adapter was trained on: the loaded model's identity (:func:`model_dir_fingerprint`) and the
    quantization applied to it (a quantized directory's own, the recipe's ``quant``, or ``None``)."""
    fp = model_dir_fingerprint(cfg.model.quantized or cfg.model.name)
    if not cfg.model.quantized:
        fp["quantization"] = cfg.quant.to_dict() if cfg.quant is not None else None
    return fp


def _bits_and_method(cfg: RecipeConfig) -> dict:
    if cfg.model.quantized:
        from ..quant.serialization import read_quant_meta

        q = read_quant_meta(cfg.model.quantized)["quantization"]
        return {"bits": q["bits"], "quant_method": q["method"]}
    if cfg.quant is not None:
        return {"bits": cfg.quant.bits, "quant_method": cfg.quant.method}
    return {"bits": 16, "quant_method": None}


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
                       extra={"adapter_init": cfg.adapter.init})
    return str((out / "base").resolve())


def evaluate_run(cfg: RecipeConfig, out: Path, base_dir: str) -> dict:
    """``lowbit evaluate`` of the trained adapter under ``cfg.eval``; results land in the run directory
    (``<set>.jsonl`` and ``summary.json``, read by ``lowbit compare``)."""
    from .evaluate import EvaluateRun, run_evaluation

    return run_evaluation(EvaluateRun(model=base_dir, eval=cfg.eval, adapter=str(out / "adapter"), out=str(out)))
