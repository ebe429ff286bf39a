"""Re-run runs of the committed study ledger (docs/study/ledger) through the built-in `study` spec and compare
their scores with the committed ones: the spec runner must reproduce the earlier driver's results exactly.

    python scripts/reproduce_study_runs.py --runs fp-lora-s0 fp-diablo-s0 fp-lora-r10-s0 --out runs/repro

Each run is the study spec's cell at its seed, with the learning rate the ledger entry records (the search's
choice), so nothing but the cell is trained. Prints a table and writes OUT/reproduction.json; exits 1 on any
difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lowbit.experiments import load_spec, run_experiment

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=["fp-lora-s0", "fp-diablo-s0", "fp-lora-r10-s0"])
    ap.add_argument("--ledger", default=str(ROOT / "docs" / "study" / "ledger"))
    ap.add_argument("--out", default="runs/study-reproduction")
    args = ap.parse_args(argv)
    old = {r: json.loads((Path(args.ledger) / f"{r}.json").read_text()) for r in args.runs}
    study = load_spec("study")
    rows, ok = [], True
    for name, entry in old.items():
        cell = next(c for c in study.cells if c.name == entry["cell"])
        spec = load_spec("study", ["lr.search=null", f"seeds=[{entry['seed']}]", "contrasts=[]"])
        spec.cells = [type(cell)(**{**cell.__dict__, "lr": entry["lr"], "seeds": None})]
        new = {r["cell"]: r for r in run_experiment(spec, Path(args.out))["runs"]}[cell.name]
        same = new["accuracy"] == entry["accuracy"] and new["loss"] == entry["loss"]
        ok &= same
        rows.append({"run": name, "lr": entry["lr"],
                     "committed": {"accuracy": entry["accuracy"], "loss": entry["loss"]},
                     "rerun": {"accuracy": new["accuracy"], "loss": new["loss"]}, "identical": same})
        print(f"{name}: acc {entry['acc_avg']:.2f} -> {new['acc_avg']:.2f}, loss {entry['loss_avg']:.6f} -> "
              f"{new['loss_avg']:.6f}: {'identical' if same else 'DIFFERENT'}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "reproduction.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
