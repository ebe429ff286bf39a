"""OpenAI's GSM8K JSONL (``grade_school_math/data/train.jsonl``) -> Math10K records.

Each line is ``{"question", "answer"}``; ``answer`` is a worked solution with calculator annotations
``<<48/2=24>>`` and a last line ``#### 72``. :func:`load_gsm8k_jsonl` strips the annotations and turns the last
line into the sentence ``"The answer is 72."`` (commas removed from the number: ``#### 1,080`` -> ``"1080"``), so
the output ends the way Math10K rationales end and the evaluation's last-number rule reads the final answer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .records import GSM8K_FIELDS, Record, check_field, format_number, read_utf8

__all__ = ["gsm8k_record", "load_gsm8k_jsonl"]

_CALC = re.compile(r"<<[^<>]*>>")  # calculator annotation: "48/2 = <<48/2=24>>24" -> "48/2 = 24"
_GSM_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*")


def gsm8k_record(question: str, solution: str) -> Record:
    """GSM8K question + worked solution -> Math10K record; raises ``ValueError`` (without location) if malformed."""
    *steps, last = solution.rstrip().split("\n")
    m = _GSM_FINAL.fullmatch(last.strip())
    if not m:
        raise ValueError(f"the solution's last line {last!r:.60} is not '#### <number>'")
    answer = format_number(m.group(1))  # "1,080" -> "1080"
    rationale = _CALC.sub("", "\n".join(steps)).strip()
    if "<<" in rationale or ">>" in rationale:
        raise ValueError("unbalanced calculator annotation '<<...>>' in the solution")
    final = f"The answer is {answer}."
    return {"instruction": question.strip(), "input": "", "output": f"{rationale}\n{final}" if rationale else final,
            "answer": answer}


def load_gsm8k_jsonl(path: str | Path) -> list[Record]:
    """Read OpenAI's GSM8K JSONL (``{"question", "answer"}`` per line) -> Math10K records.

    ``output`` is the solution without ``<<...>>`` annotations, its ``#### N`` line replaced by
    ``"The answer is N."``; ``answer`` is ``N`` without commas. Blank lines are skipped. Raises ``ValueError``
    naming the file and the 1-based line for invalid JSON, a missing/non-string field or a solution without a
    final ``#### <number>`` line, and for a file with no records.
    """
    path = Path(path)
    out = []
    for lineno, line in enumerate(read_utf8(path, "GSM8K file").split("\n"), 1):
        if not line.strip():
            continue
        where = f"line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: {where} is not valid JSON ({e})") from None
        q, a = (check_field(path, where, obj, k) for k in GSM8K_FIELDS)
        try:
            out.append(gsm8k_record(q, a))
        except ValueError as e:
            raise ValueError(f"{path}: {where}: {e}") from None
    if not out:
        raise ValueError(f"{path}: no records (the file is empty)")
    return out
