"""The README's tour runs as written: its bash block is extracted from README.md and executed line by line in a
fresh directory, with sizes shrunk (fewer calibration windows, steps, MagR iterations, test problems and generated
tokens) so that it takes about a minute; every command must succeed and leave the files the README promises. The
full-size lines' wall times are measured and stated in the README (docs/RESULTS.md has the measurement)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Size knobs only: the commands, their options and their order stay the README's.
SHRINK = [(r"--nsamples \d+", "--nsamples 4"), (r"--seqlen \d+", "--seqlen 64"),
          (r"train\.max_steps=\d+", "train.max_steps=2 train.batch_size=2 calibration.nsamples=4 "
                                    "calibration.seqlen=64 eval.max_new_tokens=16 eval.batch_size=4"),
          (r"quant\.options\.magr_iters=\d+", "quant.options.magr_iters=2"), (r"eval\.limit=\d+", "eval.limit=1"),
          (r"--limit \d+", "--limit 2 --max-new-tokens 16")]


def tour_commands(readme: str) -> list[str]:
    """The tour's shell commands: the first ``bash`` block of its section, continuation lines joined, comments and
    blank lines dropped."""
    section = readme.split("## A 5-minute tour", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    joined = re.sub(r"\\\n", "", block)
    lines = [re.sub(r"\s+#[^'\"]*$", "", line).strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def shrink(cmd: str) -> str:
    for pattern, repl in SHRINK:
        cmd = re.sub(pattern, repl, cmd)
    return cmd


def test_tour_block_is_what_the_test_runs():
    cmds = tour_commands((ROOT / "README.md").read_text())
    assert [c.split()[1] for c in cmds if c.startswith("lowbit")] == [
        "quantize", "finetune", "evaluate", "evaluate", "compare", "export", "evaluate"]
    # Every size in the README line is one the shrinking knows, so the test runs the README's commands.
    assert all(shrink(c) != c for c in cmds if c.split()[:2] in (["lowbit", "quantize"], ["lowbit", "finetune"]))


def test_readme_tour_runs(tmp_path):
    cmds = [shrink(c) for c in tour_commands((ROOT / "README.md").read_text())]
    script = "\n".join(['set -euo pipefail', 'lowbit() { "$PY" -m lowbit "$@"; }', 'python() { "$PY" "$@"; }',
                        *cmds])
    env = {**os.environ, "PY": sys.executable, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = tmp_path / "runs"
    for f in ("q2/layer_errors.md", "try/adapter/adapter_config.json", "try/summary.json", "try/loss.png",
              "compare/compare.md", "compare/compare.png", "try-gptq/config.json", "eval-export/summary.json"):
        assert (runs / f).is_file(), f
    # finetune's end-of-run summary: last loss, the evaluation's average, where the run is
    assert "training loss: last logged" in r.stdout and "average" in r.stdout and "run directory: runs/try" in r.stdout
