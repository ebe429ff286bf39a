"""Math10K records and the LLM-Adapters JSON format: field names, validation, and the one reader of such files.

A *Math10K record* is ``{"instruction", "input", "output", "answer"}``, four strings: the question, an optional
context (usually ``""``), a rationale ending in ``"The answer is X."`` and the label ``X``. LLM-Adapters stores
records as one JSON array per file -- the training set ``math_10k.json`` and every ``<set>/test.json`` -- and
:func:`load_llm_adapters_json` is the only reader of that layout: training data and evaluation sets both go
through it. Every record is validated and a bad one is reported by file, index and field.

The field names of the other formats lowbit reads live here too (GSM8K JSONL, MAWPS train format), together with
:func:`record_text`, the plain text of a record of any of them (for calibration text).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "FIELDS",
    "GSM8K_FIELDS",
    "MAWPS_FIELDS",
    "REQUIRED",
    "TEXT_FIELDS",
    "check_field",
    "format_number",
    "llm_adapters_records",
    "load_llm_adapters_json",
    "normalize_question",
    "question_key",
    "read_json_array",
    "read_utf8",
    "record_text",
]

#: The fields of a Math10K record that hold text, in order (``answer`` repeats the end of ``output``).
TEXT_FIELDS = ("instruction", "input", "output")
#: All fields of a Math10K record, in the order every reader returns them.
FIELDS = TEXT_FIELDS + ("answer",)
#: The fields a training record must have (``input`` defaults to ``""``).
REQUIRED = ("instruction", "output", "answer")
#: OpenAI GSM8K JSONL: the question and the worked solution ending in ``#### N``.
GSM8K_FIELDS = ("question", "answer")
#: MAWPS train format: the fields a record is converted from (``segmented_text`` and ``id`` are not needed).
MAWPS_FIELDS = ("original_text", "equation", "ans")

Record = dict[str, str]


def normalize_question(text: str) -> str:
    """The key of a question for overlap checks: lowercase, letters and digits only (any script)."""
    return re.sub(r"[\W_]+", "", text.lower())


def question_key(rec: Mapping[str, Any]) -> str:
    """:func:`normalize_question` of a record's question, whatever its format: a Math10K record's ``instruction``
    and ``input``, a GSM8K line's ``question``, a MAWPS train record's ``original_text``; ``""`` for anything
    else."""
    if "instruction" in rec:
        return normalize_question(f"{rec['instruction']} {rec.get('input', '')}")
    for field in ("question", "original_text"):
        if isinstance(rec.get(field), str):
            return normalize_question(rec[field])
    return ""


def format_number(x: float | int | str, max_decimals: int = 4) -> str:
    """``8.0`` -> ``"8"``, ``0.8333333`` -> ``"0.8333"``, ``"1,080"`` -> ``"1080"``: at most ``max_decimals``
    decimals, no trailing zeros, no thousands separators. (The evaluation accepts |pred - label| <= 1e-3.)"""
    v = float(str(x).replace(",", "")) if isinstance(x, str) else float(x)
    if not math.isfinite(v):
        raise ValueError(f"not a finite number: {x!r}")
    r = round(v, max_decimals)
    if r == int(r):
        return str(int(r))  # also turns -0.0 into "0"
    return f"{r:.{max_decimals}f}".rstrip("0").rstrip(".")


#: The fix for a training or evaluation file that is not UTF-8 text.
DATA_FILE_FIX = ("data files are UTF-8 text (LLM-Adapters .json, GSM8K .jsonl): re-save it as UTF-8 or pass the right "
                 "file")


def read_utf8(path: Path, what: str, fix: str = DATA_FILE_FIX) -> str:
    """The text of ``path`` decoded as UTF-8. A file that is not (binary data, another encoding) is a
    ``ValueError`` naming ``what`` and the file, the first undecodable byte and its offset, and ``fix``: Python's own
    error names neither the file nor what to do."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        kind = "binary data, not text" if b"\0" in data[:8192] else "not UTF-8 text"
        raise ValueError(f"{what} {path} is {kind}: byte 0x{data[e.start]:02x} at offset {e.start} is not valid "
                         f"UTF-8; {fix}") from None


def read_json_array(path: Path) -> list:
    """The non-empty JSON array in ``path``; raises ``ValueError`` naming the file otherwise."""
    try:
        data = json.loads(read_utf8(path, "data file"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected a JSON array of records") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of records, found a JSON {type(data).__name__}")
    if not data:
        raise ValueError(f"{path}: the JSON array is empty, no records")
    return data


def check_field(path: Path, where: str, rec: Any, name: str, kinds: type | tuple[type, ...] = str,
                default: Any = None):
    """``rec[name]`` checked to be of ``kinds``; a missing field gives ``default`` or raises if that is None."""
    if not isinstance(rec, dict):
        raise ValueError(f"{path}: {where} is a JSON {type(rec).__name__}, expected an object")
    if name not in rec:
        if default is not None:
            return default
        raise ValueError(f"{path}: {where} lacks field {name!r}")
    v = rec[name]
    if not isinstance(v, kinds) or isinstance(v, bool):
        want = kinds.__name__ if isinstance(kinds, type) else " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"{path}: {where} field {name!r} is a {type(v).__name__} ({v!r:.60}), expected {want}")
    return v


def llm_adapters_records(data: list, path: Path, required: Sequence[str] = REQUIRED) -> list[Record]:
    """Validate already-parsed LLM-Adapters records -> Math10K records with exactly the keys :data:`FIELDS`.

    Fields in ``required`` must be present; the others default to ``""``; every field must be a string.
    Extra fields are dropped. ``path`` only names the source in error messages.
    """
    out = []
    for i, rec in enumerate(data):
        where = f"record {i}"
        r = {k: check_field(path, where, rec, k) for k in required}
        for k in FIELDS:
            if k not in r:
                r[k] = check_field(path, where, rec, k, default="")
        out.append({k: r[k] for k in FIELDS})  # every record has the same four keys, in the same order
    return out


def load_llm_adapters_json(path: str | Path, required: Sequence[str] = REQUIRED) -> list[Record]:
    """Read an LLM-Adapters JSON array (``math_10k.json``, ``*/test.json``) -> validated Math10K records.

    Raises ``ValueError`` for a file that is not a non-empty JSON array, or for a record that is not an object,
    lacks a field of ``required`` (default ``instruction``/``output``/``answer``; test sets need only
    ``instruction`` and ``answer``) or holds a non-string in one of the four fields, naming the file, the record
    index (0-based) and the field, e.g. ``math_10k.json: record 17 lacks field 'output'``.
    """
    path = Path(path)
    return llm_adapters_records(read_json_array(path), path, required)


def record_text(rec: Any) -> str:
    """The plain text of one record of any format lowbit reads (calibration text).

    A string is itself; ``{"text"}`` gives its text; GSM8K ``{"question", "answer"}`` gives both, one per line;
    a Math10K/Alpaca record its non-empty ``instruction``, ``input`` and ``output``, one per line; anything else
    (MAWPS, unknown formats) all its string fields, one per line. Not a string or an object: ``""``.
    """
    if isinstance(rec, str):
        return rec
    if not isinstance(rec, dict):
        return ""
    if "text" in rec:
        return str(rec["text"])
    if all(k in rec for k in GSM8K_FIELDS):
        return "\n".join(str(rec[k]) for k in GSM8K_FIELDS)
    parts = [str(rec[k]) for k in TEXT_FIELDS if rec.get(k)]
    if not parts:
        parts = [str(v) for v in rec.values() if isinstance(v, str)]
    return "\n".join(parts)
