"""The benchmark summary table: every ratio with its 95% interval and verdict, generated from the results JSON.

Each benchmark script writes a ``verdicts`` list into its ``benchmarks/results/<name>.json`` (one entry per
ratio that has a target: ``what``, ``ratio``, ``ci95``, ``repeats``, ``target``, ``verdict``; see
``_common.verdict_row``). This script collects them (results of ``--quick`` smoke runs are skipped), writes
``benchmarks/results/summary.md`` and replaces the table between the ``bench-table`` markers in the README and in
``docs/RESULTS.md``, so no number in those tables is typed by hand. ``make bench`` runs it last; ``--check`` exits 1
if a document's table differs from what the results give (the test suite runs the same comparison).

Usage: ``python benchmarks/summarize.py [--results benchmarks/results] [--check]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
DOCS = ("README.md", "docs/RESULTS.md")


def collect(results_dir: Path) -> list[dict]:
    """Every verdict row of every non-quick result file, in file-name order; each row gains its ``source``."""
    rows = []
    for path in sorted(results_dir.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("quick") or not isinstance(data.get("verdicts"), list):
            continue
        rows += [{**v, "source": path.name} for v in data["verdicts"]]
    return rows


def render(rows: list[dict]) -> str:
    """The markdown table (one line per ratio) with its header."""
    lines = ["| benchmark | ratio | median | 95% CI | rounds | target | verdict |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["ci95"]
        lines.append(f"| `{r['source']}` | {r['what']} | {r['ratio']:.3f} | [{lo:.3f}, {hi:.3f}] | {r['repeats']} | "
                     f"{r['target'] or '—'} | {r['verdict']} |")
    return "\n".join(lines)


def splice(readme: str, table: str) -> str:
    """``readme`` with the text between the markers replaced by ``table``."""
    if START not in readme or END not in readme:
        raise SystemExit(f"README has no {START} ... {END} markers: add them where the benchmark table goes")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}\n{END}{tail}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--docs", nargs="+", default=[str(ROOT / d) for d in DOCS], help="documents holding the table")
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when the README's table is stale")
    args = ap.parse_args()
    table = render(collect(Path(args.results)))
    from _common import atomic_write_text  # noqa: PLC0415 - the script's own directory is on sys.path

    stale = []
    for doc in map(Path, args.docs):
        text = doc.read_text()
        new = splice(text, table)
        if new != text:
            stale.append(doc)
            if not args.check:
                atomic_write_text(doc, new)
    if args.check:
        if stale:
            print(f"benchmark table differs from benchmarks/results in {', '.join(map(str, stale))}: "
                  "run python benchmarks/summarize.py")
        return 1 if stale else 0
    atomic_write_text(Path(args.results) / "summary.md", table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
