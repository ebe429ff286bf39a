"""Shared by the reliability tests and ``scripts/bad_input_table.py``: fault injection (truncate a file, flip a
byte, delete it), lowbit commands run as killable subprocesses, the small demo the kill tests run, the catalogue of
every file lowbit persists with its documented behaviour under each fault, and the recorder of the messages that
bad input produces (active when ``LOWBIT_BAD_INPUT_LOG`` names a file)."""

from __future__ import annotations

import fnmatch
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RECORD_ENV = "LOWBIT_BAD_INPUT_LOG"
FAULTS = ("truncate", "flip", "delete")

# ---------------------------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Fault:
    kind: str  # truncate | flip | delete
    at: int = 0  # truncate: bytes kept; flip: byte position
    xor: int = 0  # flip: the mask applied to that byte

    def apply(self, path: Path) -> str:
        """Damage ``path``; returns what was done, in words."""
        if self.kind == "delete":
            path.unlink()
            return "deleted"
        data = bytearray(path.read_bytes())
        if self.kind == "truncate":
            path.write_bytes(bytes(data[: self.at]))
            return f"truncated to {self.at} of {len(data)} bytes"
        old = data[self.at]
        data[self.at] ^= self.xor
        path.write_bytes(bytes(data))
        return f"byte {self.at} of {len(data)} changed (0x{old:02x} -> 0x{data[self.at]:02x})"


def faults_for(path: Path, seed: str, flips: int = 3) -> list[Fault]:
    """A seeded set of faults for one file: two truncations (a random length, and the last byte only), ``flips``
    single-byte changes (one in the first 64 bytes, where headers live, the others anywhere), one digit changed
    into another (text stays valid JSON or YAML: only a checksum notices), and deletion."""
    rng = random.Random(f"{seed}:{path.name}")
    data = path.read_bytes()
    size = len(data)
    cases = [Fault("truncate", rng.randrange(size)), Fault("truncate", size - 1)]
    for i in range(flips):
        cases.append(Fault("flip", rng.randrange(min(size, 64) if i == 0 else size), rng.randrange(1, 256)))
    digits = [i for i, b in enumerate(data[: 1 << 20]) if 0x30 <= b <= 0x39]
    if digits:
        cases.append(Fault("flip", rng.choice(digits), 0x01))  # 0<->1, 2<->3, ...
    return cases + [Fault("delete")]


# ---------------------------------------------------------------------------------------------- commands

def env() -> dict[str, str]:
    """One thread per process (two spinning OpenMP threads per process on a shared 2-core machine are many times
    slower), offline, and this folder importable (the small demo)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}


def lowbit(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowbit", *map(str, args)]


def run(argv: list[str], log: Path, kill_after: float | None = None) -> tuple[int, float, bool]:
    """Run ``argv`` (output to ``log``); with ``kill_after``, SIGKILL it after that many seconds if it still runs.
    Returns (exit status, seconds, whether it was killed)."""
    t0 = time.perf_counter()
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env(), stdout=out, stderr=subprocess.STDOUT)
        killed = False
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed = True
    return proc.returncode, time.perf_counter() - t0, killed


def kill_delays(seed: str, seconds: float, n: int) -> list[float]:
    """``n`` seeded delays within a command's measured duration (past the first 30%, mostly interpreter start)."""
    rng = random.Random(seed)
    return [rng.uniform(0.3, 0.95) * seconds for _ in range(n)]


def quantize_args(out: Path, export: Path, method: str = "rtn") -> list[str]:
    calib = ["--calib", "tiny", "--nsamples", "4", "--seqlen", "64"] if method == "gptq" else []
    return ["quantize", "--model", "tiny", "--method", method, "--bits", "2", "--group-size", "64", *calib,
            "--ppl-windows", "0", "--out", str(out), "--export-gptq", str(export)]


RECIPE = "tiny-gptq-lora-2bit"
FINETUNE_OVERRIDES = ["quant.method=rtn", "train.max_steps=3", "train.save_steps=1", "train.batch_size=2",
                      "train.threads=1", "data.num_examples=6", "train.logging_steps=1", "train.warmup_ratio=0.0",
                      "eval.datasets=[synthetic-gsm8k]", "eval.limit=2", "eval.max_new_tokens=8", "eval.batch_size=1",
                      "eval.response_loss=true", "eval.loss_limit=2"]


def finetune_args(out: Path) -> list[str]:
    return ["finetune", RECIPE, *FINETUNE_OVERRIDES, f"output_dir={out}"]


def evaluate_args(out: Path) -> list[str]:
    return ["evaluate", "--model", "tiny", "--datasets", "synthetic-gsm8k,synthetic-aqua", "--limit", "3",
            "--max-new-tokens", "8", "--batch-size", "1", "--response-loss", "--loss-limit", "2", "--out", str(out)]


# The demo reduced to a spec of one cell on one shared (RTN) base, 2 steps, 2 problems of one family: every kind of
# file an experiment keeps (a base and its stamp, its perplexity, the run's stamp, a ledger entry, the run), in
# seconds rather than minutes.
SMALL_SPEC = {
    "name": "small", "base_perplexity": True,
    "budget": {"steps": 2, "batch_size": 2, "num_examples": 4, "calib_samples": 4, "logging_steps": 1,
               "eval": {"sets": ["synthetic-gsm8k"], "limit": 2, "max_new_tokens": 8}},
    "lr": {"values": {"lora-quantized": 5e-3}},
    "cells": [{"name": "2bit-lora", "recipe": RECIPE, "overrides": ["quant.method=rtn", "train.threads=1"]}],
}


def small_spec_file(out: str | Path) -> Path:
    """The reduced demo's spec, written beside ``out``."""
    import yaml

    p = Path(out).parent / f"{Path(out).name}-spec.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("# lowbit experiment (the reliability tests' reduced demo)\n" + yaml.safe_dump(SMALL_SPEC))
    return p


def small_demo(out: str | Path) -> dict:
    """The reduced demo (``SMALL_SPEC``) in this process."""
    from lowbit.experiments import load_spec, run_experiment

    return run_experiment(load_spec(small_spec_file(out)), out)


def demo_argv(out: Path) -> list[str]:
    return [sys.executable, "-m", "lowbit", "experiment", str(small_spec_file(out)), "--out", str(out)]



# ---------------------------------------------------------------------------------------------- the catalogue

ERR = "error naming the file"
CHK = "error naming the file (checksum mismatch)"
TRUNC = "error naming the file (truncated or corrupt)"


@dataclass(frozen=True)
class Entry:
    artifact: str
    pattern: str  # file name pattern inside the artifact's directory
    reader: str  # what reads it back
    truncated: str
    corrupt: str  # a changed byte
    missing: str


QM, EXPORT, ADAPTER, CKPT, RUN, EVAL, DEMO = ("quantized model", "GPTQ export", "adapter", "training checkpoint",
                                             "run directory", "evaluation", "experiment cache")
_Q_READER = ("`load_quantized` (`lowbit evaluate --model`, `finetune model.quantized=`, `lowbit experiment` "
             "shared bases)")
_DEMO_Q = "; `lowbit experiment`: the base is rebuilt"
CATALOGUE = [
    Entry(QM, "quant_config.json", _Q_READER, TRUNC + " (not valid JSON)" + _DEMO_Q,
          CHK + " (sealed) or not valid JSON" + _DEMO_Q,
          ERR + ": the weights hold packed layers but quant_config.json does not exist" + _DEMO_Q),
    Entry(QM, "model.safetensors", _Q_READER, TRUNC + _DEMO_Q, CHK + " or a damaged header" + _DEMO_Q,
          ERR + _DEMO_Q),
    Entry(QM, "config.json", _Q_READER, TRUNC + _DEMO_Q, CHK + _DEMO_Q, ERR + " (listed in the manifest)" + _DEMO_Q),
    Entry(QM, "generation_config.json", _Q_READER, TRUNC + _DEMO_Q, CHK + _DEMO_Q,
          ERR + " (listed in the manifest)" + _DEMO_Q),
    Entry(QM, "tokenizer*.json", _Q_READER + "; the tokenizer", TRUNC + _DEMO_Q, CHK + _DEMO_Q,
          ERR + " (listed in the manifest)" + _DEMO_Q),
    Entry(QM, "lowbit_run.json", "the same `lowbit quantize --out` command run again (is it the same model?)",
          "the rerun refuses to replace the directory, naming the file (`--overwrite` replaces it)",
          "refused, naming the file (checksum mismatch: sealed)",
          "read as an earlier lowbit's output: quant_config.json decides"),
    Entry(QM, "layer_errors.*", "not read back (a report of `lowbit quantize`)", "nothing reads it",
          "nothing reads it", "nothing reads it"),
    Entry(EXPORT, "quantize_config.json", "the same `lowbit quantize --export-gptq` command run again",
          "the rerun refuses to replace the directory, naming the file (`--overwrite` replaces it)",
          "refused as truncated, or (settings still the same) replaced by the rerun", "refused, as truncated"),
    Entry(EXPORT, "*", "not read by lowbit (GPTQModel, transformers)", "the loader's own error",
          "undetected by lowbit (no checksum: the loaders would not check one)", "the loader's own error"),
    Entry(ADAPTER, "adapter_model.safetensors", "`load_adapter` (`lowbit evaluate --adapter`), `--resume`", TRUNC,
          CHK + " or a damaged header", ERR),
    Entry(ADAPTER, "adapter_config.json", "`load_adapter`, `--resume`", TRUNC, CHK, ERR),
    Entry(ADAPTER, "lowbit_adapter.json", "`load_adapter`, `--resume`", TRUNC + " (not valid JSON)",
          CHK + " (sealed) or not valid JSON",
          "loads as a PEFT adapter (same weights and outputs) with a warning that its base cannot be checked"),
    Entry(CKPT, "COMPLETE", "`lowbit finetune --resume`", TRUNC + " (not valid JSON)",
          CHK + " (sealed) or not valid JSON",
          "the checkpoint counts as unfinished: --resume takes the previous complete one (none: an error)"),
    Entry(CKPT, "trainer_state.json", "`--resume`", TRUNC, CHK,
          ERR + " (the Trainer alone would restart from step 0)"),
    Entry(CKPT, "optimizer.pt", "`--resume`", TRUNC, CHK, ERR + " (the Trainer alone would reset the optimizer)"),
    Entry(CKPT, "scheduler.pt", "`--resume`", TRUNC, CHK, ERR),
    Entry(CKPT, "rng_state.pth", "`--resume`", TRUNC, CHK, ERR),
    Entry(RUN, "lowbit_run.json", "`lowbit finetune` with or without `--resume` (is it the same run?)",
          "without `--resume`: refused as a run; `--resume`: " + ERR,
          "without `--resume`: refused as a run; `--resume`: " + ERR + " (checksum mismatch: sealed)",
          "read as an earlier lowbit's run: config.yaml decides"),
    Entry(RUN, "config.yaml", "`--resume` (settings check of a run without lowbit_run.json), `lowbit compare`, "
          "`lowbit export`",
          ERR + " (YAML error, or the recipe differs)", ERR + " (YAML error, or the recipe differs)",
          "`--resume`: " + ERR + "; `compare`: run.json's keys only"),
    Entry(RUN, "log.jsonl", "the loss plot, `--resume` (drops later steps)",
          "a cut last line is ignored", "the damaged line is skipped with a warning naming it (sealed lines)",
          "the plot is empty"),
    Entry(RUN, "run.json", "`lowbit compare`, `lowbit experiment` (a trained run without its ledger entry)",
          TRUNC + "; experiment: the run is trained again", CHK + " (sealed); experiment: the run is trained again",
          "`compare`: its keys are read from the evaluated adapter (method, trainable parameters counted in its "
          "safetensors); experiment: the run is trained again"),
    Entry(RUN, "loss.png", "not read back", "nothing reads it", "nothing reads it", "nothing reads it"),
    Entry(EVAL, "settings.json", "`lowbit evaluate` (resume check)", TRUNC + " (`--overwrite` discards the rows)",
          CHK + " (sealed); `--overwrite` discards the rows", "regenerated, unless rows exist: then " + ERR),
    Entry(EVAL, "*.jsonl", "`lowbit evaluate` (resume)", "a cut last line is dropped and regenerated",
          ERR + " and the line (checksum mismatch, or not a row)", "the set is regenerated"),
    Entry(EVAL, "*.loss.json", "`lowbit evaluate --response-loss` (cache)", "recomputed, with a warning",
          "recomputed, with a warning (sealed)", "recomputed"),
    Entry(EVAL, "summary.json", "`lowbit compare`; `evaluate` (and `lowbit experiment`) only rewrite it",
          TRUNC + "; experiment: rewritten", CHK + " (sealed); experiment: rewritten",
          "`compare`: " + ERR + "; experiment: rewritten"),
    Entry(DEMO, "bases/perplexity.json", "`lowbit experiment` (cache)", "recomputed, with a warning",
          "recomputed, with a warning (sealed)", "recomputed"),
    Entry(DEMO, "bases/*/base_stamp.json", "`lowbit experiment` (is the shared base built with these settings?)",
          "the base is rebuilt, with a warning", "the base is rebuilt, with a warning (sealed)", "the base is rebuilt"),
    Entry(DEMO, "ledger/*.json", "`lowbit experiment` (is the run finished?)",
          "the entry is recomputed (evaluation resumed from the run's rows), with a warning",
          "the entry is recomputed, with a warning (sealed)", "the entry is recomputed"),
    Entry(DEMO, "runs/*/experiment_run.json", "`lowbit experiment` (was the run trained with these settings?)",
          "the run is trained again, with a warning", "the run is trained again, with a warning (sealed)",
          "the run is trained again"),
    Entry(DEMO, "preregistration.json", "`lowbit experiment` (are the primary contrasts and analysis the ones "
          "registered before the first final run?)", TRUNC + ", with the fix", CHK + " (sealed)",
          "registered from the spec if no final run exists yet, else " + ERR),
    Entry(DEMO, "results.json", "not read back", "nothing reads it", "nothing reads it", "nothing reads it"),
    Entry(DEMO, "report.md", "not read back", "nothing reads it", "nothing reads it", "nothing reads it"),
    Entry(DEMO, "cells.png", "not read back", "nothing reads it", "nothing reads it", "nothing reads it"),
    Entry(DEMO, "comparison.*", "not read back", "nothing reads it", "nothing reads it", "nothing reads it"),
]

# Where each artifact lives inside the output of each command: (directory pattern, artifact).
LAYOUT = {
    "quantize": [("", QM)],
    "export": [("", EXPORT)],
    "finetune": [("", RUN), ("", EVAL), ("base/", QM), ("adapter/", ADAPTER), ("checkpoint-*/", CKPT),
                 ("checkpoint-*/adapter/", ADAPTER)],
    "evaluate": [("", EVAL)],
    "demo": [("", DEMO), ("bases/*/", QM), ("runs/*/", RUN), ("runs/*/", EVAL), ("runs/*/adapter/", ADAPTER),
             ("runs/*/checkpoint-*/", CKPT), ("runs/*/checkpoint-*/adapter/", ADAPTER)],
}


def entry_for(command: str, rel: str) -> Entry | None:
    """The catalogue entry of the file ``rel`` (relative to the output of ``command``), or ``None``."""
    folder, _, name = rel.rpartition("/")
    folder = folder + "/" if folder else ""
    for prefix, artifact in LAYOUT[command]:
        for e in CATALOGUE:
            if e.artifact != artifact:
                continue
            if e.artifact == DEMO:  # demo entries name their path from the demo's output directory
                if fnmatch.fnmatch(rel, e.pattern):
                    return e
            elif fnmatch.fnmatch(folder, prefix) and fnmatch.fnmatch(name, e.pattern):
                return e
    return None


def persisted_files(root: Path) -> list[str]:
    """Every file under ``root``, relative, but hidden temporary siblings of an interrupted atomic write."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


# ---------------------------------------------------------------------------------------------- recording

_TMP = re.compile(r"/tmp/pytest-of-[^/]+/pytest-\d+/|" + re.escape(str(ROOT)) + "/?")


def normalise(message: str) -> str:
    """A message without this machine's temporary and checkout paths (stable between runs)."""
    return _TMP.sub(lambda m: "<repo>/" if m.group(0).startswith(str(ROOT)) else "<tmp>/", message)


def record(**row) -> None:
    """Append ``row`` (messages normalised) to the file named by ``LOWBIT_BAD_INPUT_LOG``, if set."""
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    row = {k: normalise(v) if isinstance(v, str) else v for k, v in row.items()}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def message_of(exc: BaseException) -> str | None:
    """What the user sees for an exception a test expected: the CLI's line, or ``Type: message``."""
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, str) else None
    if isinstance(exc, (AssertionError, KeyboardInterrupt)) or not isinstance(exc, Exception):
        return None
    return f"{type(exc).__name__}: {exc}"
