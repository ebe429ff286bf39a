"""The training loop's pieces around Hugging Face ``Trainer``: adapter-only checkpoints committed by a ``COMPLETE``
marker (a process killed mid-save never resumes from a half-written checkpoint), a JSONL log, and the loss plot."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..io import atomic_write_figure, atomic_write_text

COMPLETE = "COMPLETE"


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


def trainer_classes():
    """The Trainer subclass and callbacks (built lazily: importing transformers is expensive)."""
    from transformers import Trainer, TrainerCallback

    from ..adapters import save_adapter, set_adapter_weights

    class AdapterTrainer(Trainer):
        """Saves and restores only the adapter; the frozen (quantized) base is never written to checkpoints."""

        def _save(self, output_dir: str | None = None, state_dict=None) -> None:
            # Trainer.save_model calls _save on every rank; two ranks writing one directory collide.
            if not self.args.should_save:
                return
            out = Path(output_dir or self.args.output_dir)
            save_adapter(self.model, out / "adapter")

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
            set_adapter_weights(model or self.model, Path(resume_from_checkpoint) / "adapter")

    class CommitCheckpoint(TrainerCallback):
        """Marks a checkpoint complete once the Trainer has written all of it (on_save runs after)."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    atomic_write_text(ckpt / COMPLETE, f"{state.global_step}\n")

    class JsonlLogger(TrainerCallback):
        """One JSON object per logging step in ``log.jsonl`` (``step``, ``loss``, ``lr``, ``epoch`` ...)."""

        def __init__(self, path: Path) -> None:
            self.path = path

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            rec = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
            if "learning_rate" in rec:
                rec["lr"] = rec.pop("learning_rate")
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()
                os.fsync(f.fileno())

    return AdapterTrainer, CommitCheckpoint, JsonlLogger


def read_log(path: str | Path) -> list[dict]:
    """Records of a ``log.jsonl``; a truncated last line (killed mid-write) is ignored."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def truncate_log(path: Path, step: int) -> None:
    """Drop records after ``step`` (the resumed checkpoint), so a resumed run does not log steps twice."""
    recs = [r for r in read_log(path) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in recs))


def plot_loss(log_path: str | Path, png_path: str | Path, title: str = "") -> None:
    """Training loss against step (matplotlib PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in read_log(log_path) if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], marker="." if len(recs) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write_figure(png_path, fig, dpi=100)
