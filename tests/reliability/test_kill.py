"""SIGKILL at seeded random points within the measured duration of ``lowbit quantize``, ``lowbit finetune`` (and
once exactly mid-checkpoint save), ``lowbit evaluate`` and ``lowbit demo`` (reduced: faultlib.small_demo). Under
every final name a kill leaves the previous complete result or the new complete one; unfinished work exists only
in its resumable form (a checkpoint without ``COMPLETE``, appended evaluation rows, hidden temporary directories).
The same command run again (with ``--resume`` where the run has a complete checkpoint) completes, with the clean
run's result: the same quantized weights and GPTQ export bit for bit, the same adapter, evaluation rows and
accuracies."""

import shutil
import sys
from pathlib import Path

import faultlib
import torch
from safetensors.torch import load_file

KILLS = 2

# `lowbit finetune` killed inside the save of checkpoint-2: adapter, optimizer and scheduler written; RNG state,
# trainer state and the COMPLETE marker not.
MID_SAVE = """
import os, signal, sys
from transformers import Trainer
real = Trainer._save_optimizer_and_scheduler
def save(self, output_dir):
    real(self, output_dir)
    if self.state.global_step == 2:
        os.kill(os.getpid(), signal.SIGKILL)
Trainer._save_optimizer_and_scheduler = save
from lowbit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _files(d: Path) -> dict[str, bytes]:
    return {rel: (d / rel).read_bytes() for rel in faultlib.persisted_files(d)} if d.is_dir() else {}


def _same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _rows_files(d: Path) -> list[Path]:
    return sorted(p for p in d.glob("*.jsonl") if p.name != "log.jsonl")


def _eval_state(d: Path) -> tuple:
    """The evaluation's result: per-set numbers and the rows files, read with lowbit's own checked readers."""
    from lowbit.eval.results import read_rows
    from lowbit.io import read_json

    s = read_json(d / "summary.json")
    sets = {k: (v["n"], v["correct"], v["accuracy"], (v.get("response_loss") or {}).get("loss"))
            for k, v in s["datasets"].items()}
    return sets, {p.name: read_rows(p) for p in _rows_files(d)}


def _check_eval_files(d: Path) -> None:
    """What a kill may leave of an evaluation: each file complete and readable (rows: a cut last line dropped)."""
    from lowbit.eval.results import read_rows
    from lowbit.io import read_json

    for name in ("settings.json", "summary.json"):
        if (d / name).exists():
            read_json(d / name)
    for p in _rows_files(d):
        read_rows(p)
    for p in d.glob("*.loss.json"):
        read_json(p)


def test_quantize(clean_quantize, tmp_path):
    """Over a previous complete result (RTN, with an export) a GPTQ quantization with --overwrite is killed: each
    of the two directories holds the previous result or the new one; the rerun gives the clean run's bytes."""
    from lowbit.quant import verify_quantized

    def argv(w):
        return faultlib.lowbit(*faultlib.quantize_args(w / "q", w / "x", method="gptq"), "--overwrite")

    ref = tmp_path / "ref"
    rc, seconds, _ = faultlib.run(argv(ref), tmp_path / "ref.log")
    assert rc == 0, (tmp_path / "ref.log").read_text()[-2000:]
    new = {"q": _files(ref / "q"), "x": _files(ref / "x")}
    for k, delay in enumerate(faultlib.kill_delays("quantize", seconds, KILLS)):
        w = tmp_path / f"kill{k}"
        shutil.copytree(clean_quantize.out, w / "q")
        shutil.copytree(clean_quantize.export, w / "x")
        old = {"q": _files(w / "q"), "x": _files(w / "x")}
        rc, _, killed = faultlib.run(argv(w), w.with_suffix(".log"), kill_after=delay)
        states = []
        for name in ("q", "x"):
            now = _files(w / name)
            if now == old[name]:
                states.append("previous")
                continue
            # The new result: complete (reports and timings aside, which differ between runs: same weights).
            assert set(now) == set(new[name]), (name, delay)
            assert now["model.safetensors"] == new[name]["model.safetensors"], (name, delay)
            states.append("new")
        verify_quantized(w / "q")
        faultlib.record(kind="kill", command="lowbit quantize", delay=round(delay, 2), killed=killed,
                        state=f"out: {states[0]}, export: {states[1]}")
        rc, _, _ = faultlib.run(argv(w), w.with_suffix(".log"))
        assert rc == 0, w.with_suffix(".log").read_text()[-2000:]
        for name in ("q", "x"):
            assert (w / name / "model.safetensors").read_bytes() == new[name]["model.safetensors"]


def _check_run_dir_after_kill(out: Path) -> str:
    """Every complete checkpoint verifies; adapter/, base/ and run.json are absent or complete."""
    from lowbit.adapters import read_adapter_meta
    from lowbit.io import read_json, verify_files
    from lowbit.quant import verify_quantized
    from lowbit.recipes.trainer import check_checkpoint, complete_checkpoints

    done = complete_checkpoints(out)
    for c in done:
        check_checkpoint(c)
    for d in [out / "adapter", *(c / "adapter" for c in done)]:
        if d.exists():
            verify_files(d, read_adapter_meta(d)["files"])
    if (out / "base").exists():
        verify_quantized(out / "base")
    if (out / "run.json").exists():
        read_json(out / "run.json")
    _check_eval_files(out)
    unfinished = sorted(p.name for p in out.glob("checkpoint-*") if p not in done)
    return (f"complete: {[c.name for c in done]}, unfinished: {unfinished}, adapter: {(out / 'adapter').exists()}, "
            f"run.json: {(out / 'run.json').exists()}")


def test_finetune(clean_finetune, tmp_path):
    from lowbit.recipes.trainer import latest_checkpoint

    cases = [("random", d) for d in faultlib.kill_delays("finetune", clean_finetune.seconds, KILLS)]
    for k, (how, delay) in enumerate([*cases, ("mid-save", None)]):
        out = tmp_path / f"kill{k}"
        log = tmp_path / f"kill{k}.log"
        if how == "mid-save":
            rc, _, killed = faultlib.run([sys.executable, "-c", MID_SAVE, *faultlib.finetune_args(out)], log)
            assert rc == -9, log.read_text()[-2000:]  # it killed itself
            assert (out / "checkpoint-2" / "optimizer.pt").is_file()
            assert not (out / "checkpoint-2" / "COMPLETE").exists()
        else:
            rc, _, killed = faultlib.run(faultlib.lowbit(*faultlib.finetune_args(out)), log, kill_after=delay)
        state = _check_run_dir_after_kill(out) if out.exists() else "nothing written"
        resume = out.exists() and latest_checkpoint(out) is not None
        faultlib.record(kind="kill", command="lowbit finetune", delay=how if delay is None else round(delay, 2),
                        killed=killed or how == "mid-save", state=state,
                        rerun="--resume" if resume else "the same command")
        rc, _, _ = faultlib.run(faultlib.lowbit(*faultlib.finetune_args(out), *(["--resume"] if resume else [])), log)
        assert rc == 0, log.read_text()[-3000:]
        assert _same_tensors(out / "adapter" / "adapter_model.safetensors",
                             clean_finetune.out / "adapter" / "adapter_model.safetensors"), (how, delay)
        assert (out / "base" / "model.safetensors").read_bytes() == \
            (clean_finetune.out / "base" / "model.safetensors").read_bytes()
        assert _eval_state(out) == _eval_state(clean_finetune.out), (how, delay)


def test_evaluate(clean_evaluate, tmp_path):
    for k, delay in enumerate(faultlib.kill_delays("evaluate", clean_evaluate.seconds, KILLS)):
        out = tmp_path / f"kill{k}"
        log = tmp_path / f"kill{k}.log"
        rc, _, killed = faultlib.run(faultlib.lowbit(*faultlib.evaluate_args(out)), log, kill_after=delay)
        if out.exists():
            _check_eval_files(out)
        rows = {p.name: len(p.read_text().splitlines()) for p in _rows_files(out)}
        faultlib.record(kind="kill", command="lowbit evaluate", delay=round(delay, 2), killed=killed,
                        state=f"rows written: {rows}, summary.json: {(out / 'summary.json').exists()}")
        rc, _, _ = faultlib.run(faultlib.lowbit(*faultlib.evaluate_args(out)), log)
        assert rc == 0, log.read_text()[-2000:]
        assert _eval_state(out) == _eval_state(clean_evaluate.out), delay


def test_demo(clean_demo, tmp_path):
    from lowbit.io import read_json
    from lowbit.quant import verify_quantized

    clean = read_json(clean_demo.out / "results.json")
    for k, delay in enumerate(faultlib.kill_delays("demo", clean_demo.seconds, KILLS)):
        out = tmp_path / f"kill{k}"
        log = tmp_path / f"kill{k}.log"
        rc, _, killed = faultlib.run(faultlib.demo_argv(out), log, kill_after=delay)
        for base in out.glob("bases/*/"):  # written atomically: absent or complete
            verify_quantized(base)
        if (out / "bases" / "perplexity.json").exists():
            read_json(out / "bases" / "perplexity.json")
        for entry in out.glob("ledger/*.json"):  # a finished run: complete
            read_json(entry)
            run = out / "runs" / entry.stem
            assert _check_run_dir_after_kill(run) and (run / "summary.json").is_file()
        faultlib.record(kind="kill", command="lowbit experiment (the reduced demo)", delay=round(delay, 2),
                        killed=killed, state=f"bases: {[p.name for p in out.glob('bases/*/')]}, finished runs: "
                                            f"{[p.stem for p in out.glob('ledger/*.json')]}")
        rc, _, _ = faultlib.run(faultlib.demo_argv(out), log)
        assert rc == 0, log.read_text()[-2000:]
        got = read_json(out / "results.json")
        assert [b["ppl"] for b in got["bases"]] == [b["ppl"] for b in clean["bases"]]
        assert [r["accuracy"] for r in got["runs"]] == [r["accuracy"] for r in clean["runs"]]
        for run in (clean_demo.out / "runs").iterdir():
            assert _same_tensors(out / "runs" / run.name / "adapter" / "adapter_model.safetensors",
                                 run / "adapter" / "adapter_model.safetensors")
