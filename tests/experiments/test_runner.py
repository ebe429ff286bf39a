"""The experiment runner on a user's own spec: two cells on one shared 2-bit base, two seeds, one contrast, a toy
budget. Killed mid-run and run again, it trains only what had not finished; the report shows the contrast with its
intervals; a changed ``QuantConfig`` field retrains the cells it affects and nothing else."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lowbit.experiments import ledger as ledger_mod
from lowbit.experiments import load_spec, run_experiment

ROOT = Path(__file__).resolve().parents[2]


def _spec(b_overrides: list[str], different_bases: bool = False) -> dict:
    return {
        "name": "my-comparison",
        "budget": {"steps": 2, "batch_size": 2, "num_examples": 4, "logging_steps": 1,
                   "eval": {"sets": ["synthetic-gsm8k", "synthetic-svamp"], "limit": 3, "max_new_tokens": 8,
                            "response_loss": True}},
        "seeds": [0, 1],
        "lr": {"scope": "family", "values": {"lora-quantized": 5e-3}},
        "cells": [{"name": "qlora-r16", "label": "QLoRA r=16", "recipe": "tiny-qlora-2bit"},
                  {"name": "qlora-r4", "label": "QLoRA r=4", "recipe": "tiny-qlora-2bit",
                   "overrides": ["adapter.rank=4", "adapter.alpha=4", *b_overrides]}],
        "contrasts": [{"a": "qlora-r16", "b": "qlora-r4", "what": "rank 16 vs rank 4, same NF2 base",
                       "different_bases": different_bases}],
    }


def _write(path: Path, spec: dict) -> Path:
    path.write_text("# lowbit experiment my.yaml\n" + yaml.safe_dump(spec, sort_keys=False))
    return path


def _trained(monkeypatch) -> list[str]:
    """Run directories the runner trains from now on."""
    seen: list[str] = []
    real = ledger_mod.finetune

    def spy(cfg, *a, **k):
        seen.append(Path(cfg.output_dir).name)
        return real(cfg, *a, **k)

    monkeypatch.setattr(ledger_mod, "finetune", spy)
    return seen


def _kill_after_first_entry(spec_file: Path, out: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "lowbit", "experiment", str(spec_file), "--out", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not list((out / "ledger").glob("*.json")):
        time.sleep(0.1)
    assert proc.poll() is None, "the experiment ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_user_spec_resumes_after_a_kill_reports_the_contrast_and_retrains_only_changed_cells(tmp_path,
                                                                                              monkeypatch):
    spec_file = _write(tmp_path / "my.yaml", _spec([]))
    out = tmp_path / "out"
    _kill_after_first_entry(spec_file, out)
    finished = {p.stem for p in (out / "ledger").glob("*.json")}
    every = {"qlora-r16-s0", "qlora-r4-s0", "qlora-r16-s1", "qlora-r4-s1"}
    assert finished and finished < every

    trained = _trained(monkeypatch)
    results = run_experiment(load_spec(spec_file), out)
    assert sorted(trained) == sorted(every - finished)  # only the unfinished runs train
    assert results["complete"] and [c["cell"] for c in results["cells"]] == ["qlora-r16", "qlora-r4"]
    (contrast,) = results["contrasts"]
    assert contrast["seeds"] == [0, 1] and contrast["response_loss"]["half"] is not None
    acc = contrast["accuracy"]
    assert acc["n_seeds"] == 2 and acc["n_problems"] == 6 and acc["lo"] <= acc["mean"] <= acc["hi"]
    assert contrast["kind"] == "exploratory" and acc["verdict"] == "exploratory"  # not pre-registered: no verdict
    report = (out / "report.md").read_text()
    assert "qlora-r16 − qlora-r4 | rank 16 vs rank 4" in report and "[" in report
    # The primary questions were registered before the first final run: adding one now is refused.
    late = _spec([])
    late["contrasts"][0]["primary"] = True
    with pytest.raises(ValueError, match="differ from those registered"):
        run_experiment(load_spec(_write(tmp_path / "late.yaml", late)), out)
    registered = (out / "preregistration.json").read_bytes()
    (out / "preregistration.json").unlink()  # nor by deleting the registration once final runs exist
    with pytest.raises(ValueError, match="can only be registered before the first final run"):
        run_experiment(load_spec(tmp_path / "late.yaml"), out)
    (out / "preregistration.json").write_bytes(registered)
    # Every ledger entry holds per-problem results and the identities of its base and training set.
    entry = json.loads((out / "ledger" / "qlora-r4-s1.json").read_text())
    assert len(entry["problems"]["synthetic-svamp"]) == 3 and entry["training_set_sha256"]
    assert {"prediction", "correct", "loss"} <= set(entry["problems"]["synthetic-svamp"][0])
    assert entry["key"]["base_weights_sha256"] and entry["key"]["config"]["quant"]["bits"] == 2

    # Nothing changed: nothing trains.
    trained.clear()
    run_experiment(load_spec(spec_file), out)
    assert trained == []
    # One QuantConfig field changed in one cell: that cell's runs (on a new base) retrain, the other's do not.
    _write(spec_file, _spec(["quant.group_size=32"], different_bases=True))
    with pytest.raises(ValueError, match="different bases"):  # unless marked, a contrast must share its base
        run_experiment(load_spec(_write(tmp_path / "bad.yaml", _spec(["quant.group_size=32"]))), out)
    trained.clear()
    run_experiment(load_spec(spec_file), out)
    assert sorted(trained) == ["qlora-r4-s0", "qlora-r4-s1"]
