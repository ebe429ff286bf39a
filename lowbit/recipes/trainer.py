"""The training loop's pieces around Hugging Face ``Trainer``: adapter-only checkpoints committed by a ``COMPLETE``
marker (a process killed mid-save never resumes from a half-written checkpoint), a JSONL log, and the loss plot.

``log.jsonl`` holds the Trainer's records every ``logging_steps`` (``loss``: the mean over the steps since the last
one, ``lr``, ``grad_norm``, ``epoch`` ...) and, between them, one ``{"step", "step_loss"}`` record per optimizer step
(its loss averaged over gradient-accumulation micro-batches and ranks, as the logged mean averages them; ``null``
when not finite). The plot draws every step with the logged means on top.

``COMPLETE`` is a sealed JSON manifest (:func:`lowbit.io.sealed`): the step and the SHA-256 of every file of the
checkpoint, which :func:`check_checkpoint` verifies before a resume. The Trainer itself would resume silently from
a checkpoint lacking ``trainer_state.json`` (from step 0) or ``optimizer.pt`` (with a fresh optimizer), and fails
with a library error on a damaged one; the manifest turns each of these into an error naming the file. A marker of
an older lowbit (the step alone) has no checksums: its required files are checked for presence only."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from ..io import (
    DamagedFileError,
    atomic_write_figure,
    atomic_write_json,
    atomic_write_text,
    check_seal,
    file_manifest,
    read_json,
    sealed,
    verify_files,
)

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
#: Files a resumable checkpoint must hold (the Trainer skips a missing one without an error).
REQUIRED = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "adapter/adapter_model.safetensors")


# ---------------------------------------------------------------------------------------------- checkpoints

def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """``checkpoint-<step>`` directories holding the ``COMPLETE`` marker, oldest first."""
    run_dir = Path(run_dir)
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and (p / COMPLETE).is_file()
             and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def discard_incomplete_checkpoints(run_dir: str | Path) -> None:
    """Delete ``checkpoint-*`` directories without ``COMPLETE`` (saves cut short by a kill): they are never resumed
    from, and the Trainer's rotation (``save_total_limit``) would count them and delete a complete one instead."""
    import shutil

    for p in Path(run_dir).glob("checkpoint-*"):
        if p.is_dir() and not (p / COMPLETE).is_file():
            shutil.rmtree(p)


def commit_checkpoint(ckpt: Path, step: int) -> None:
    """Write ``ckpt/COMPLETE``: the step and the SHA-256 of every file of the checkpoint, sealed."""
    names = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != COMPLETE)
    atomic_write_json(ckpt / COMPLETE, {"step": step, "files": file_manifest(ckpt, names)}, seal=True)


def check_checkpoint(ckpt: Path) -> None:
    """Raise :class:`~lowbit.io.DamagedFileError` (``FileNotFoundError`` for a missing file) naming the damaged file
    of a complete checkpoint, with how to resume without it as the fix."""
    older = [c for c in complete_checkpoints(ckpt.parent) if c != ckpt]
    fix = (f"the checkpoint is damaged: delete {ckpt} to resume from {older[-1].name}" if older else
           "the checkpoint is damaged and no older complete one exists: start over without --resume in a new "
           "output_dir")
    if (ckpt / COMPLETE).read_bytes().strip().isdigit():  # an older marker: presence only
        _check_present(ckpt, REQUIRED, fix)
        return
    try:
        manifest = read_json(ckpt / COMPLETE)
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or not set(REQUIRED) <= set(files):
            raise DamagedFileError(ckpt / COMPLETE, f"{ckpt / COMPLETE} is corrupt (no manifest of the required "
                                                    f"files)", fix)
        _check_present(ckpt, list(files), fix)
        verify_files(ckpt, files)
    except DamagedFileError as e:
        raise DamagedFileError(e.path, e.reason, fix) from None


def _check_present(ckpt: Path, names, fix: str) -> None:
    missing = [n for n in names if not (ckpt / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{ckpt / missing[0]} does not exist; {fix}")


def trainer_classes():
    """The Trainer subclass and callbacks (built lazily: importing transformers is expensive)."""
    CommitCheckpoint, JsonlLogger = _callback_classes()
    return _adapter_trainer_class(JsonlLogger), CommitCheckpoint, JsonlLogger


def _adapter_trainer_class(logger_class: type):
    from transformers import Trainer

    from ..adapters import save_adapter, set_adapter_weights

    class AdapterTrainer(Trainer):
        """Saves and restores only the adapter; the frozen (quantized) base is never written to checkpoints. Keeps
        the loss of the optimizer step under way for the log's per-step records (:meth:`take_step_loss`); a
        ``logger_class`` callback among its callbacks is given the trainer to take it from."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.step_loss = None  # tensor: the sum of this step's micro-batch losses (each already / GA)
            for cb in self.callback_handler.callbacks:
                if isinstance(cb, logger_class):
                    cb.trainer = self

        def training_step(self, *args, **kwargs):
            # The same per-micro-batch value the Trainer adds into the loss it logs.
            loss = super().training_step(*args, **kwargs)
            self.step_loss = loss.detach() if self.step_loss is None else self.step_loss + loss.detach()
            return loss

        def take_step_loss(self) -> float | None:
            """The finished step's loss averaged over ranks (every rank must call this), then cleared."""
            loss, self.step_loss = self.step_loss, None
            return None if loss is None else rank_mean(loss)

        def _save(self, output_dir: str | None = None, state_dict=None) -> None:
            # Trainer.save_model calls _save on every rank; two ranks writing one directory collide.
            if not self.args.should_save:
                return
            out = Path(output_dir or self.args.output_dir)
            save_adapter(self.model, out / "adapter")

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
            set_adapter_weights(model or self.model, Path(resume_from_checkpoint) / "adapter")

    return AdapterTrainer


def rank_mean(value) -> float | None:
    """A scalar tensor averaged over the ranks of a distributed run (a collective: every rank calls it), as a
    float; ``None`` when it is not finite."""
    import torch

    value = value.detach().float().clone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(value)
        value /= torch.distributed.get_world_size()
    out = float(value)
    return out if math.isfinite(out) else None


def _append_record(path: Path, rec: dict) -> None:
    """One sealed line, flushed to disk (a killed run loses at most the line being written)."""
    with open(path, "a") as f:
        f.write(json.dumps(sealed(rec)) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _callback_classes():
    from transformers import TrainerCallback

    class CommitCheckpoint(TrainerCallback):
        """Marks a checkpoint complete once the Trainer has written all of it (on_save runs after)."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    commit_checkpoint(ckpt, state.global_step)

    class JsonlLogger(TrainerCallback):
        """One sealed JSON object per logging step in ``log.jsonl`` (``step``, ``loss``, ``lr``, ``epoch`` ...), and
        one ``{step, step_loss}`` per optimizer step when its Trainer is an ``AdapterTrainer``."""

        def __init__(self, path: Path) -> None:
            self.path = path
            self.trainer = None  # set by AdapterTrainer

        def on_step_end(self, args, state, control, **kwargs):
            if self.trainer is None:
                return
            loss = self.trainer.take_step_loss()  # on every rank: an all-reduce
            if state.is_world_process_zero:
                _append_record(self.path, {"step": state.global_step, "step_loss": loss})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            rec = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
            if "learning_rate" in rec:
                rec["lr"] = rec.pop("learning_rate")
            _append_record(self.path, rec)

    return CommitCheckpoint, JsonlLogger


def read_log(path: str | Path) -> list[dict]:
    """Records of a ``log.jsonl``. The log only feeds the loss plot: a last line cut short (killed mid-write) is
    ignored, and a damaged line (not JSON, or its seal disagrees) is skipped with a warning naming it."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    text = p.read_bytes().decode("utf-8", errors="replace")
    lines = text.splitlines()
    for k, line in enumerate(lines, 1):
        try:
            rec = check_seal(json.loads(line), p)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            if k < len(lines) or text.endswith("\n"):  # not an interrupted append
                log.warning("%s line %d is damaged and skipped (%s)", p, k, str(e)[:120])
            continue
        out.append(rec)
    return out


def truncate_log(path: Path, step: int) -> None:
    """Drop records after ``step`` (the resumed checkpoint), so a resumed run does not log steps twice."""
    recs = [r for r in read_log(path) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(sealed(r)) + "\n" for r in recs))


def loss_curves(recs: list[dict]) -> dict[str, list]:
    """The two curves of the plot from ``log.jsonl`` records: ``steps``/``step_loss`` (every step; a non-finite
    loss is ``None``) and ``logged_steps``/``logged`` (the means logged every ``logging_steps``)."""
    steps = [r for r in recs if "step_loss" in r]
    logged = [r for r in recs if "loss" in r]
    return {"steps": [r["step"] for r in steps], "step_loss": [r["step_loss"] for r in steps],
            "logged_steps": [r["step"] for r in logged], "logged": [r["loss"] for r in logged]}


def loss_figure(recs: list[dict], title: str = ""):
    """The matplotlib figure of :func:`loss_curves`: every step's loss as a thin line, the logged means on top (a
    log of an older lowbit, without per-step records, draws the means alone)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = loss_curves(recs)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if c["steps"]:
        y = [float("nan") if v is None else v for v in c["step_loss"]]  # a gap where the loss was not finite
        ax.plot(c["steps"], y, lw=0.8, alpha=0.6, color="tab:blue", label="each step",
                marker="." if len(y) < 50 else None, ms=3)
    if c["logged"]:
        ax.plot(c["logged_steps"], c["logged"], color="tab:orange" if c["steps"] else "tab:blue",
                marker="o" if len(c["logged"]) < 50 else None, ms=4, label="logged mean")
    if c["steps"] and c["logged"]:
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_loss(log_path: str | Path, png_path: str | Path, title: str = "") -> None:
    """Training loss against step (:func:`loss_figure` of ``log_path``, a matplotlib PNG written atomically)."""
    atomic_write_figure(png_path, loss_figure(read_log(log_path), title), dpi=100)
