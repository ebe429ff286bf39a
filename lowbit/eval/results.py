"""Per-example result rows of an evaluation (``<set>.jsonl``) and per-set accuracy: reading back (crash-safe),
writing, scoring, and the printed summary. Each row is sealed (:func:`lowbit.io.sealed`), so a damaged row is
reported, not scored as if it were a generation."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..data.testsets import DatasetSpec
from ..io import DamagedFileError, atomic_write_text, check_seal, sealed
from .answers import VARIANTS as CHOICE_RULES
from .answers import score_generation

log = logging.getLogger(__name__)


def read_rows(path: Path) -> dict[int, dict]:
    """Rows of a ``<set>.jsonl`` keyed by example index (a later row for the same index wins).

    A last line that is cut short (a crash mid-write) is dropped and the file rewritten without it, so that the next
    append starts on a fresh line; a bad line elsewhere (not a row, or its seal disagrees) is an error naming it."""
    if not path.is_file():
        return {}
    data = path.read_bytes()  # decoded line by line: a damaged byte is a bad line, not a UnicodeDecodeError
    lines = data.split(b"\n")
    rows: dict[int, dict] = {}
    dropped = False
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = check_seal(json.loads(line), path)
            rows[int(row["index"])] = row
        except (KeyError, TypeError, ValueError) as e:  # json.JSONDecodeError, UnicodeDecodeError: ValueErrors
            if k == len(lines) - 1:  # the last line, no newline after it: an interrupted append
                dropped = True
                continue
            why = "corrupt (checksum mismatch)" if isinstance(e, DamagedFileError) else "not a result row"
            raise ValueError(f"{path} line {k + 1} is {why}; delete the file to regenerate that set, "
                             f"or pass --overwrite") from None
    if dropped or (data and not data.endswith(b"\n")):
        log.warning("%s: dropping a truncated last line (interrupted run)", path)
        write_rows(path, rows)
    return rows


def _line(row: dict) -> str:
    return json.dumps(sealed(row), ensure_ascii=False) + "\n"


def write_rows(path: Path, rows: dict[int, dict]) -> None:
    atomic_write_text(path, "".join(_line(rows[i]) for i in sorted(rows)))


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append rows and fsync them: a crash loses at most the rows being appended (a cut last line)."""
    with open(path, "a") as f:
        f.write("".join(_line(r) for r in rows))
        f.flush()
        os.fsync(f.fileno())


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
        if d["accuracy"] is None:  # a response-loss-only evaluation
            rl = d.get("response_loss") or {}
            loss, n = rl.get("loss", float("nan")), rl.get("n", 0)
            lines.append(f"{d['display']:<14} response loss {loss:.4f}  ({n} records)")
            continue
        lines.append(f"{d['display']:<14} {d['accuracy']:6.1f}%  ({d['correct']}/{d['n']}){extra}")
    if summary["average"] is not None:
        lines.append(f"{'average':<14} {summary['average']:6.1f}%")
    return "\n".join(lines)
