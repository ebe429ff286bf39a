"""Per-example result rows of an evaluation (``<set>.jsonl``) and per-set accuracy: reading back (crash-safe),
writing, scoring, and the printed summary."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..data.testsets import DatasetSpec
from ..io import atomic_write_text
from .answers import VARIANTS as CHOICE_RULES
from .answers import score_generation

log = logging.getLogger(__name__)


def read_rows(path: Path) -> dict[int, dict]:
    """Rows of a ``<set>.jsonl`` keyed by example index (a later row for the same index wins).

    A last line that is cut short (a crash mid-write) is dropped and the file rewritten without it, so that the next
    append starts on a fresh line; a bad line elsewhere is an error."""
    if not path.is_file():
        return {}
    text = path.read_text()
    lines = text.split("\n")
    rows: dict[int, dict] = {}
    dropped = False
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[int(row["index"])] = row
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if k == len(lines) - 1:  # the last line, no newline after it: an interrupted append
                dropped = True
                continue
            raise ValueError(f"{path} line {k + 1} is not a result row; delete the file to regenerate that set, "
                             f"or pass --overwrite") from None
    if dropped or (text and not text.endswith("\n")):
        log.warning("%s: dropping a truncated last line (interrupted run)", path)
        write_rows(path, rows)
    return rows


def write_rows(path: Path, rows: dict[int, dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(rows[i], ensure_ascii=False) + "\n" for i in sorted(rows)))


def make_row(index: int, prompt: str, generation: str, label: str, kind: str, rule: str) -> dict:
    pred, ok = score_generation(generation, label, kind, rule)
    return {"index": index, "prompt": prompt, "generation": generation, "extracted": pred, "label": label,
            "correct": ok}


def set_result(spec: DatasetSpec, rows: list[dict], rule: str) -> dict:
    """Accuracy of one set from its rows (re-extracted from the generations with ``rule``)."""
    n = len(rows)
    correct = sum(score_generation(r["generation"], r["label"], spec.kind, rule)[1] for r in rows)
    res = {"name": spec.name, "display": spec.display, "kind": spec.kind, "n": n, "correct": correct,
           "accuracy": 100.0 * correct / n if n else 0.0}
    if spec.kind == "choice":
        res["accuracy_by_rule"] = {
            r: 100.0 * sum(score_generation(x["generation"], x["label"], "choice", r)[1] for x in rows) / max(1, n)
            for r in CHOICE_RULES}
    return res


def format_summary(summary: dict) -> str:
    """Per-set accuracy lines and the average, as printed by ``lowbit evaluate``."""
    lines = []
    for d in summary["datasets"].values():
        extra = ""
        if "accuracy_by_rule" in d:
            extra = "  [" + ", ".join(f"{r}: {a:.1f}%" for r, a in d["accuracy_by_rule"].items()) + "]"
        lines.append(f"{d['display']:<14} {d['accuracy']:6.1f}%  ({d['correct']}/{d['n']}){extra}")
    lines.append(f"{'average':<14} {summary['average']:6.1f}%")
    return "\n".join(lines)
