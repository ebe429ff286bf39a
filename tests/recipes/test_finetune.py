"""The fine-tuning recipe on the embedded tiny model: training, resume, atomic checkpoints, data errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lowbit.recipes.config import load_recipe
from lowbit.recipes.finetune import finetune
from lowbit.recipes.trainer import complete_checkpoints, read_log
from lowbit.rundir import RunDir

FAST = ["data.num_examples=160", "train.batch_size=8", "train.logging_steps=1",
        "train.warmup_ratio=0.0", "train.threads=2", "calibration.nsamples=8", "calibration.seqlen=128",
        "eval=null"]


def _run(tmp_path, recipe, *overrides, resume=False, callbacks=None):
    cfg = load_recipe(recipe, [*FAST, f"output_dir={tmp_path}", *overrides])
    return finetune(cfg, resume=resume, callbacks=callbacks)


def _adapter(path):
    return load_file(str(path / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("recipe", ["tiny-diablo-2bit", "tiny-gptq-lora-2bit"])
def test_tiny_recipe_on_2bit_base_trains_with_decreasing_loss(tmp_path, recipe):
    summary = _run(tmp_path, recipe, "train.max_steps=30", "train.save_steps=100")
    recs = [r for r in read_log(tmp_path / "log.jsonl") if "loss" in r]
    assert len(recs) >= 25
    first = sum(r["loss"] for r in recs[:5]) / 5
    last = sum(r["loss"] for r in recs[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    for f in ("config.yaml", "log.jsonl", "loss.png", "run.json", "adapter/adapter_config.json"):
        assert (tmp_path / f).is_file(), f
    assert summary["bits"] == 2 and summary["steps"] == 30 and summary["trainable_params"] > 0
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The end of the run, told truly: the last logged loss, and the mean under both its names.
    assert summary["last_logged_loss"] == recs[-1]["loss"]
    assert summary["final_loss"] == summary["mean_train_loss"] and summary["mean_train_loss"] > last
    stamp = RunDir(tmp_path, "finetune").read_stamp()
    assert stamp["complete"] is True and stamp["settings"]["train"]["max_steps"] == 30


def test_loss_plot_has_every_step_with_the_logged_means_on_top(tmp_path):
    """20 steps logged every 10 (2 micro-batches per step): log.jsonl keeps its two logged means and gains one
    record per step, whose mean over each logging window is the logged mean; the plot draws 20 + 2 points."""
    from lowbit.recipes.trainer import loss_figure

    summary = _run(tmp_path, "tiny-gptq-lora-2bit", "quant.method=rtn", "train.max_steps=20",
                   "train.logging_steps=10", "train.save_steps=100", "train.batch_size=2", "train.grad_accum=2")
    recs = read_log(tmp_path / "log.jsonl")
    logged = [r for r in recs if "loss" in r]
    steps = {r["step"]: r["step_loss"] for r in recs if "step_loss" in r}
    assert [r["step"] for r in logged] == [10, 20] and sorted(steps) == list(range(1, 21))
    for r in logged:
        window = [steps[k] for k in range(r["step"] - 9, r["step"] + 1)]
        assert sum(window) / 10 == pytest.approx(r["loss"], rel=1e-5)
    assert summary["last_logged_loss"] == logged[-1]["loss"]  # the logged records keep their meaning
    per_step, means = loss_figure(recs).axes[0].lines
    assert list(per_step.get_xdata()) == list(range(1, 21))
    assert list(per_step.get_ydata()) == [steps[k] for k in range(1, 21)]
    assert list(means.get_xdata()) == [10, 20] and list(means.get_ydata()) == [r["loss"] for r in logged]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _StopAt:
    """A callback that kills training (as a crash would) once a step is reached."""

    def __init__(self, step):
        from transformers import TrainerCallback

        outer = self

        class CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == outer.step:
                    raise KeyboardInterrupt("simulated kill")

        self.step, self.cb = step, CB()


def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(tmp_path):
    common = ["quant.method=rtn", "train.max_steps=12", "train.save_steps=4"]
    _run(tmp_path / "full", "tiny-gptq-lora-2bit", *common)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", "tiny-gptq-lora-2bit", *common, callbacks=[_StopAt(6).cb])
    assert [p.name for p in complete_checkpoints(tmp_path / "cut")] == ["checkpoint-4"]
    summary = _run(tmp_path / "cut", "tiny-gptq-lora-2bit", *common, resume=True)
    assert summary["resumed_from"] == "checkpoint-4"
    a, b = _adapter(tmp_path / "full"), _adapter(tmp_path / "cut")
    for k in a:
        assert (a[k] - b[k]).norm() <= 1e-6 * a[k].norm() + 1e-12, k
    recs = read_log(tmp_path / "cut" / "log.jsonl")
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 13))  # neither repeats nor misses a step
    assert [r["step"] for r in recs if "step_loss" in r] == list(range(1, 13))  # the per-step records too


def test_kill_mid_checkpoint_never_resumes_from_the_partial_one(tmp_path, monkeypatch):
    from transformers import Trainer

    common = ["quant.method=rtn", "adapter.adapter=diablo", "adapter.init=default", "train.max_steps=12",
              "train.save_steps=4"]
    _run(tmp_path / "full", "tiny-diablo-2bit", *common)
    original = Trainer._save_rng_state

    def crash(self, output_dir):  # the adapter of checkpoint-8 is on disk, the rest is not
        if self.state.global_step == 8:
            raise KeyboardInterrupt("killed mid-save")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", crash)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", "tiny-diablo-2bit", *common)
    monkeypatch.setattr(Trainer, "_save_rng_state", original)
    assert (tmp_path / "cut" / "checkpoint-8" / "adapter").is_dir()  # written, but never committed
    assert [p.name for p in complete_checkpoints(tmp_path / "cut")] == ["checkpoint-4"]
    summary = _run(tmp_path / "cut", "tiny-diablo-2bit", *common, resume=True)
    assert summary["resumed_from"] == "checkpoint-4"
    a, b = _adapter(tmp_path / "full"), _adapter(tmp_path / "cut")
    for k in a:
        assert (a[k] - b[k]).norm() <= 1e-6 * a[k].norm() + 1e-12, k


def test_bad_data_and_settings_fail_before_training(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "1+1?", "input": "", "output": "2", "answer": "2"},
                               {"instruction": "2+2?", "input": ""}]))
    with pytest.raises(ValueError, match=r"bad.json.*record 1.*output"):
        _run(tmp_path / "a", "tiny-diablo-2bit", f"data.source={bad}")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="empty"):
        _run(tmp_path / "b", "tiny-diablo-2bit", f"data.source={empty}")
    with pytest.raises(ValueError, match="max_length"):
        _run(tmp_path / "c", "tiny-diablo-2bit", "data.max_length=16")
    for d in ("a", "b", "c"):
        assert not (tmp_path / d / "adapter").exists()


def test_existing_run_needs_resume(tmp_path):
    _run(tmp_path, "tiny-diablo-2bit", "quant.method=rtn", "train.max_steps=2")
    with pytest.raises(ValueError, match="--resume"):
        _run(tmp_path, "tiny-diablo-2bit", "quant.method=rtn", "train.max_steps=2")
    with pytest.raises(ValueError, match="differs"):
        _run(tmp_path, "tiny-diablo-2bit", "quant.method=rtn", "train.max_steps=4", "train.lr=0.1", resume=True)
    assert torch.isfinite(next(iter(_adapter(tmp_path).values()))).all()


def test_two_gloo_processes_match_one_process_with_double_batch(tmp_path):
    """Data parallelism through the Trainer's own engine (torchrun + gloo): 2 x batch b == 1 x batch 2b."""
    import os
    import subprocess
    import sys

    common = ["quant.method=rtn", "train.max_steps=4", "train.save_steps=100", "train.threads=1",
              "data.num_examples=64"]
    _run(tmp_path / "one", "tiny-diablo-2bit", "train.batch_size=8", *common)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    import socket

    with socket.socket() as s:  # a free port: a fixed one collides with any other run on this machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "-m",
           "lowbit", "finetune", "tiny-diablo-2bit", *FAST, *common, "train.batch_size=4",
           f"output_dir={tmp_path / 'two'}"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    # Adam divides by sqrt(v): entries with near-zero gradients amplify float reordering noise (all-reduce sums
    # in another order), so compare whole tensors in norm.
    for k in a:
        rel = ((a[k] - b[k]).norm() / a[k].norm()).item()
        assert rel < 1e-4, (k, rel)
    # Logged every step, the per-step loss equals the logged one: averaged over both ranks, not rank 0's alone.
    for d in ("one", "two"):
        recs = read_log(tmp_path / d / "log.jsonl")
        steps = {r["step"]: r["step_loss"] for r in recs if "step_loss" in r}
        assert len(steps) == 4
        for r in (r for r in recs if "loss" in r):
            assert steps[r["step"]] == pytest.approx(r["loss"], rel=1e-5), (d, r)
