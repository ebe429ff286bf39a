"""Run a test module's ``__main__`` under Triton's CPU interpreter: ``TRITON_INTERPRET=1`` must be set before triton
is imported, so the cases run in a fresh subprocess that prints its results as one JSON line."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(script: str) -> list[dict]:
    """``python script`` with ``TRITON_INTERPRET=1`` and the checkout on the path; its last stdout line as JSON."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
