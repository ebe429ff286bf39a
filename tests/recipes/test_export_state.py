"""`lowbit export` states the run's state: a run whose evaluation has not finished is exported with a warning
naming what is missing; a run whose training is not finished (resumed and still training) is refused."""

import logging
import shutil

import pytest

from lowbit.io import atomic_write_json, read_json
from lowbit.recipes.config import load_recipe
from lowbit.recipes.export_run import ExportRun, export_run
from lowbit.recipes.finetune import finetune
from lowbit.rundir import RunDir

SETS = ["synthetic-gsm8k", "synthetic-mawps"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-step run on the tiny model that evaluated 2 sets (1 example each)."""
    out = tmp_path_factory.mktemp("export_state") / "run"
    finetune(load_recipe("tiny-gptq-lora-2bit", [
        "quant.method=rtn", "train.max_steps=2", "train.save_steps=100", "train.batch_size=2", "train.threads=1",
        "data.num_examples=4", "train.warmup_ratio=0.0", f"eval.datasets=[{','.join(SETS)}]", "eval.limit=1",
        "eval.max_new_tokens=4", "eval.batch_size=1", f"output_dir={out}"]))
    return out


def _export(src, tmp_path, caplog) -> list[logging.LogRecord]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lowbit.recipes.export_run"):
        out = export_run(ExportRun(run_dir=str(src), out=str(tmp_path / "export"), format="float", dtype="float32"))
    assert any(out.glob("*.safetensors"))
    return [r for r in caplog.records if r.name == "lowbit.recipes.export_run"]


def _copy(run, dst):
    return shutil.copytree(run, dst, ignore=shutil.ignore_patterns("checkpoint-*"))


def test_finished_run_is_exported_saying_so(run, tmp_path, caplog):
    records = _export(run, tmp_path, caplog)
    assert not [r for r in records if r.levelno >= logging.WARNING]
    assert any("training finished" in r.message and "evaluation finished" in r.message for r in records)


def test_run_still_evaluating_is_exported_with_a_warning(run, tmp_path, caplog):
    # Evaluation started, nothing finished yet: no summary.json.
    first = _copy(run, tmp_path / "first")
    (first / "summary.json").unlink()
    (warning,) = [r for r in _export(first, tmp_path / "a", caplog) if r.levelno == logging.WARNING]
    assert "evaluation has not finished (no summary.json yet" in warning.message
    assert "Exporting the final adapter anyway" in warning.message
    # One set done: the summary as `lowbit evaluate` leaves it between sets (complete=False).
    half = _copy(run, tmp_path / "half")
    summary = read_json(half / "summary.json")
    del summary["datasets"][SETS[1]]
    atomic_write_json(half / "summary.json", {**summary, "complete": False}, seal=True)
    (warning,) = [r for r in _export(half, tmp_path / "b", caplog) if r.levelno == logging.WARNING]
    assert f"summary.json has {SETS[0]}, not {SETS[1]}" in warning.message


def test_run_still_training_is_refused(run, tmp_path):
    """Resumed to train further: run.json and adapter/ are the previous finish's, the stamp says unfinished."""
    resumed = _copy(run, tmp_path / "resumed")
    rd = RunDir(resumed, "finetune")
    rd.write_stamp(rd.read_stamp()["settings"], complete=False)  # what `lowbit finetune --resume` writes first
    with pytest.raises(ValueError, match=r"training is not finished .*--resume`\), then export"):
        export_run(ExportRun(run_dir=str(resumed), out=str(tmp_path / "o"), format="float"))
    assert not (tmp_path / "o").exists()
    # Killed before run.json (the first training): refused too, as before.
    (resumed / "run.json").unlink()
    with pytest.raises(ValueError, match="not a finished `lowbit finetune` run"):
        export_run(ExportRun(run_dir=str(resumed), out=str(tmp_path / "o"), format="float"))
