"""What a finished fine-tuning run scored, read back from the files ``lowbit finetune`` and ``lowbit evaluate`` wrote
in its directory: per-set accuracy and response loss, and **per problem** the prediction, whether it was correct and
its response loss, so that problem-level statistics can be computed later from these records alone."""

from __future__ import annotations

from pathlib import Path

from ..eval.results import read_rows
from ..io import read_json


def _problems(run_dir: Path, name: str, loss_file: dict | None) -> list[dict]:
    """One record per test problem: ``{index, prediction, correct, loss}`` (``None`` where not measured)."""
    rows = read_rows(run_dir / f"{name}.jsonl") if (run_dir / f"{name}.jsonl").is_file() else {}
    losses = {int(i): float(m) for i, m, _ in (loss_file or {}).get("per_record", [])}
    out = []
    for i in sorted(set(rows) | set(losses)):
        row = rows.get(i, {})
        out.append({"index": i, "prediction": row.get("extracted"), "correct": row.get("correct"),
                    "loss": losses.get(i)})
    return out


def run_results(run_dir: str | Path, summary: dict | None = None) -> dict:
    """``{"accuracy": {set: %}, "loss": {set: nats/token}, "acc_avg", "loss_avg", "problems": {set: [...]},
    "trainable_params", "train_time_s", "method", "bits", "training_set_sha256"}`` of a finished run directory."""
    run_dir = Path(run_dir)
    summary = summary or read_json(run_dir / "summary.json", f"evaluate the run again (delete {run_dir})")
    run = read_json(run_dir / "run.json", f"train the run again (delete {run_dir})")
    acc, loss, problems = {}, {}, {}
    for name, d in summary["datasets"].items():
        if d.get("accuracy") is not None:
            acc[name] = d["accuracy"]
        if d.get("response_loss"):
            loss[name] = d["response_loss"]["loss"]
        loss_path = run_dir / f"{name}.loss.json"
        problems[name] = _problems(run_dir, name, read_json(loss_path) if loss_path.is_file() else None)
    return {"accuracy": acc, "loss": loss, "acc_avg": sum(acc.values()) / len(acc) if acc else None,
            "loss_avg": sum(loss.values()) / len(loss) if loss else None, "problems": problems,
            "trainable_params": run["trainable_params"], "train_time_s": run["train_time_s"],
            "method": run.get("method"), "bits": run.get("bits"),
            "training_set_sha256": (run.get("training_set") or {}).get("records_sha256")}
