"""What merging loses: for each fine-tuned run, (a) base + adapter, (b) ``lowbit export --format float``, (c) the
GPTQ export (re-quantized with GPTQ on the merged model), (d) ``--requant rtn``, (e) ``--format gptq-lora`` (the
base in GPTQ layout + the LoRA adapter, unmerged; LoRA-family runs only), each scored by the same evaluation
(synthetic test sets: accuracy and held-out response loss). Writes a markdown table and JSON.

Usage: ``python scripts/export_merge_table.py RUN_DIR [RUN_DIR ...] --out DIR [--limit 100]``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from lowbit.eval.config import EvalConfig
from lowbit.io import atomic_write_json, atomic_write_text
from lowbit.recipes.evaluate import EvaluateRun, run_evaluation
from lowbit.recipes.export_run import ExportRun, export_run

SETS = ["synthetic-gsm8k", "synthetic-svamp", "synthetic-mawps", "synthetic-aqua"]


def scores(summary: dict) -> dict:
    d = summary["datasets"]
    acc = [v["accuracy"] for v in d.values() if v.get("accuracy") is not None]
    loss = [v["response_loss"]["loss"] for v in d.values()]
    return {"acc": sum(acc) / len(acc) if acc else None, "loss": sum(loss) / len(loss)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=100)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    ev = EvalConfig(datasets=SETS, limit=args.limit, response_loss=True, batch_size=32, max_new_tokens=96)
    rows = []
    for run in map(Path, args.runs):
        info = json.loads((run / "run.json").read_text())
        row = {"run": run.name, "method": info["method"], "bits": info["bits"]}
        row["a"] = scores(run_evaluation(EvaluateRun(model=info["base"], adapter=str(run / "adapter"), eval=ev,
                                                     out=str(out / run.name / "a-adapter"))))
        for key, kw in (("b", {"format": "float", "dtype": "float32"}), ("c", {"format": "gptq"}),
                        ("d", {"format": "gptq", "requant": "rtn"})):
            d = out / run.name / f"{key}-export"
            if not (d / "lowbit_export.json").is_file():
                export_run(ExportRun(run_dir=str(run), out=str(d), overwrite=True, **kw))
            ev_out = str(out / run.name / f"{key}-eval")
            row[key] = scores(run_evaluation(EvaluateRun(model=str(d), eval=ev, out=ev_out)))
        if info.get("adapter") == "lora":
            d = out / run.name / "e-export"
            if not (d / "lowbit_export.json").is_file():
                export_run(ExportRun(run_dir=str(run), out=str(d), overwrite=True, format="gptq-lora"))
            row["e"] = scores(run_evaluation(EvaluateRun(model=str(d / "base"), adapter=str(d / "adapter"), eval=ev,
                                                         out=str(out / run.name / "e-eval"))))
        rows.append(row)
        atomic_write_json(out / "export_merge.json", {"limit": args.limit, "rows": rows})
    lines = ["| run | bits | (a) base + adapter | (b) float merge | (c) GPTQ re-quantized | (d) RTN re-quantized | "
             "(c) closer to (a) than (d) | (e) gptq-lora pair |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cell = lambda s: f"{s['loss']:.4f} / {s['acc']:.1f}%"  # noqa: E731
        closer = abs(r["c"]["loss"] - r["a"]["loss"]) < abs(r["d"]["loss"] - r["a"]["loss"])
        lines.append(f"| {r['run']} ({r['method']}) | {r['bits']} | {cell(r['a'])} | {cell(r['b'])} | "
                     f"{cell(r['c'])} | {cell(r['d'])} | {'yes' if closer else 'NO'} | "
                     f"{cell(r['e']) if 'e' in r else '– (not LoRA)'} |")
    md = ("Held-out response loss / average accuracy on the four synthetic test sets "
          f"({args.limit} problems each):\n\n" + "\n".join(lines) + "\n")
    atomic_write_text(out / "export_merge.md", md)
    print(md)


if __name__ == "__main__":
    main()
