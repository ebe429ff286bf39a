"""Training data of the Math10K setting: readers for the real files, mixing, and the documented substitute.

Formats read (all into *Math10K records*: ``{"instruction", "input", "output", "answer"}``, four strings)
---------------------------------------------------------------------------------------------------------
* **LLM-Adapters JSON** (``math_10k.json``, ``dataset/<name>/test.json``): one JSON array of records with
  ``instruction``, ``output``, ``answer`` (strings) and an optional ``input`` (missing -> ``""``). Read by
  :func:`load_llm_adapters_json`; every record is validated and a bad one is reported by file, index and field.
* **OpenAI GSM8K JSONL** (``grade_school_math/data/train.jsonl``): one ``{"question", "answer"}`` object per line;
  ``answer`` is a worked solution with calculator annotations ``<<48/2=24>>`` and a last line ``#### 72``.
  :func:`load_gsm8k_jsonl` strips the annotations and turns the last line into the sentence
  ``"The answer is 72."`` (commas removed from the number: ``#### 1,080`` -> ``"1080"``), so the output ends the
  way Math10K rationales end and the evaluation's last-number rule reads the final answer.
* **MAWPS train format** (``dataset/mawps/trainset.json``): ``{"id", "original_text", "segmented_text",
  "equation", "ans"}`` with an equation such as ``"X=(9.0*4.0)"``. :func:`load_mawps_train` writes a one-line
  rationale from the equation, ``"x = 9 * 4 = 36. The answer is 36."``, or, for an equation in implicit form,
  ``"x - 6 = 52, so x = 58. The answer is 58."``. Each equation is evaluated (a small AST evaluator, no
  ``eval``) and must agree with ``ans``; the 20 of 1,898 records of the shipped file whose equation is broken
  (``X=0.32=0.21``) or contradicts ``ans`` (``x=1222-513`` with ``ans`` 208; ``x=40/7`` with ``ans`` 5, a
  floor the equation does not say) are dropped with a logged count (:func:`mawps_to_record` raises the reason).

Numbers written by the converters go through :func:`format_number` (``8.0`` -> ``"8"``, at most 4 decimals); the
``answer`` field always equals the number in the closing ``"The answer is X."`` sentence.

The substitute for the missing Math10K training set
---------------------------------------------------
``math_10k.json`` (GSM8K + MAWPS + 1,000 AQuA rationales, about 10K records) is not in ``shared/data``
(see its README). :func:`default_math_training_set` uses it when present; otherwise it builds the substitute
**GSM8K train (7,473) + MAWPS train (1,878 usable)**, 9,324 records after the overlap filter below, with a logged
warning. Differences a reader must know: no AQuA-style multiple-choice examples (Math10K has 1,000), and GSM8K's
own terse rationales instead of Math10K's generated ones.

Test sets are never trained on: :func:`find_test_overlap` compares questions after lowercasing and removing
everything but letters and digits (whitespace, punctuation and its spacing: MAWPS writes ``"cost ?"``, the
test sets ``"cost?"``). GSM8K train shares no question with any of the seven test sets; MAWPS train shares 27
records (28 test questions) with ``mawps/test.json`` and none with GSM8K, SVAMP or AQuA; those 27 are dropped by
default. MAWPS train also holds most of AddSub (326/395 test questions), MultiArith (490/600) and SingleEq
(426/508) -- as the real Math10K does, which is why LLM-Adapters evaluates on MAWPS instead of those three;
``test_sets=ALL_TEST_SETS`` drops those records too (it keeps 653 of the 1,878 MAWPS records, the default 1,851).
"""

from __future__ import annotations

import ast
import json
import logging
import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # datasets is imported lazily: the readers are plain Python
    import datasets

log = logging.getLogger(__name__)

__all__ = [
    "ALL_TEST_SETS",
    "FIELDS",
    "PAPER_TEST_SETS",
    "check_no_test_overlap",
    "default_math_training_set",
    "find_test_overlap",
    "format_number",
    "load_gsm8k_jsonl",
    "load_llm_adapters_json",
    "load_mawps_train",
    "load_source",
    "load_test_sets",
    "mawps_to_record",
    "mix_sources",
    "normalize_question",
]

FIELDS = ("instruction", "input", "output", "answer")
_REQUIRED = ("instruction", "output", "answer")
#: Folders (under the data directory) of the four test sets of the paper tables (METHODS.md §4).
PAPER_TEST_SETS = ("gsm8k", "SVAMP", "mawps", "AQuA")
#: ... and of all seven LLM-Adapters arithmetic test sets.
ALL_TEST_SETS = PAPER_TEST_SETS + ("AddSub", "MultiArith", "SingleEq")
#: Where LLM-Adapters keeps the training set, relative to the data directory (shared/data/README.md).
MATH10K_RELPATH = Path("ft-training_set") / "math_10k.json"
GSM8K_TRAIN_RELPATH = Path("gsm8k_openai") / "train.jsonl"
MAWPS_TRAIN_RELPATH = Path("mawps") / "trainset.json"

Record = dict[str, str]


# --------------------------------------------------------------------------------------------------- helpers
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


def normalize_question(text: str) -> str:
    """The key of a question for overlap checks: lowercase, letters and digits only (any script)."""
    return re.sub(r"[\W_]+", "", text.lower())


def _read_json_array(path: Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected a JSON array of records") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of records, found a JSON {type(data).__name__}")
    if not data:
        raise ValueError(f"{path}: the JSON array is empty, no records")
    return data


def _field(path: Path, where: str, rec: Any, name: str, kinds: type | tuple[type, ...] = str, default: Any = None):
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


# ----------------------------------------------------------------------------------------- LLM-Adapters JSON
def _llm_adapters_records(data: list, path: Path) -> list[Record]:
    out = []
    for i, rec in enumerate(data):
        where = f"record {i}"
        r = {k: _field(path, where, rec, k) for k in _REQUIRED}
        r["input"] = _field(path, where, rec, "input", default="")
        out.append({k: r[k] for k in FIELDS})  # extra fields are dropped: every record has the same four keys
    return out


def load_llm_adapters_json(path: str | Path) -> list[Record]:
    """Read an LLM-Adapters JSON array (``math_10k.json``, ``*/test.json``) -> validated Math10K records.

    Raises ``ValueError`` for a file that is not a non-empty JSON array, or for a record that is not an object,
    lacks ``instruction``/``output``/``answer`` or holds a non-string in one of the four fields, naming the
    file, the record index (0-based) and the field, e.g. ``math_10k.json: record 17 lacks field 'output'``.
    """
    path = Path(path)
    return _llm_adapters_records(_read_json_array(path), path)


# -------------------------------------------------------------------------------------------------- GSM8K
_CALC = re.compile(r"<<[^<>]*>>")  # calculator annotation: "48/2 = <<48/2=24>>24" -> "48/2 = 24"
_GSM_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*")


def _gsm8k_record(question: str, solution: str) -> Record:
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
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: {where} is not valid JSON ({e})") from None
            q, a = (_field(path, where, obj, k) for k in ("question", "answer"))
            try:
                out.append(_gsm8k_record(q, a))
            except ValueError as e:
                raise ValueError(f"{path}: {where}: {e}") from None
    if not out:
        raise ValueError(f"{path}: no records (the file is empty)")
    return out


# -------------------------------------------------------------------------------------------------- MAWPS
class _BadEquation(ValueError):
    pass


_BINOPS = {ast.Add: ("+", lambda a, b: a + b), ast.Sub: ("-", lambda a, b: a - b),
           ast.Mult: ("*", lambda a, b: a * b), ast.Div: ("/", lambda a, b: a / b)}


def _check_tree(node: ast.AST) -> set[str]:
    """Allow only numbers, names and + - * / (unary -/+); return the names used."""
    names = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            names.add(n.id)
        elif isinstance(n, ast.Constant):
            if isinstance(n.value, bool) or not isinstance(n.value, int | float):
                raise _BadEquation(f"constant {n.value!r} is not a number")
        elif isinstance(n, ast.BinOp):
            if type(n.op) not in _BINOPS:
                raise _BadEquation(f"operator {type(n.op).__name__} is not one of + - * /")
        elif isinstance(n, ast.UnaryOp):
            if not isinstance(n.op, ast.USub | ast.UAdd):
                raise _BadEquation(f"operator {type(n.op).__name__} is not unary - or +")
        elif not isinstance(n, ast.Expression | ast.Load | ast.operator | ast.unaryop):
            raise _BadEquation(f"{type(n).__name__} is not allowed in an equation")
    return names


def _evaluate(node: ast.AST, env: Mapping[str, float]) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, env)
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.UnaryOp):
        v = _evaluate(node.operand, env)
        return -v if isinstance(node.op, ast.USub) else v
    a, b = _evaluate(node.left, env), _evaluate(node.right, env)
    try:
        return _BINOPS[type(node.op)][1](a, b)
    except ZeroDivisionError:
        raise _BadEquation("division by zero") from None


def _render(node: ast.AST) -> str:
    """Expression text with minimal parentheses, spaces around operators, ``9.0`` -> ``9``, names lowercased."""

    class Tidy(ast.NodeTransformer):
        def visit_Constant(self, n):  # noqa: N802 (ast API)
            return ast.Constant(int(n.value)) if float(n.value).is_integer() else n

        def visit_Name(self, n):  # noqa: N802
            return ast.Name(n.id.lower(), ast.Load())

    return ast.unparse(Tidy().visit(ast.parse(ast.unparse(node), mode="eval")))


def _decimals(text: str) -> int:
    """Decimals written in a number's text once trailing zeros are dropped: "0.530" -> 2, "18.0" -> 0."""
    frac = text.partition(".")[2].rstrip("0") if "e" not in text.lower() else ""
    return len(frac)


def _agrees(value: float, ans: float, ans_text: str) -> bool:
    """``value`` (from the equation) agrees with the label ``ans``: within 0.1% (MAWPS equations use 0.6667 for
    2/3), or ``ans`` is ``value`` rounded to the decimals ``ans`` is written with (``0.53`` for 0.53336)."""
    tol = 1e-3 * max(1.0, abs(ans))
    d = _decimals(ans_text)
    if d:
        tol = max(tol, 0.5 * 10.0**-d + 1e-12)
    return abs(value - ans) <= tol


def mawps_to_record(raw: Mapping[str, Any]) -> Record:
    """One MAWPS train-format record -> Math10K record with a rationale built from its equation.

    ``{"original_text": "Each ticket costs $ 9.00 . How much do 4 tickets cost ?", "equation": "X=(9.0*4.0)",
    "ans": 36.0}`` -> output ``"x = 9 * 4 = 36. The answer is 36."``, answer ``"36"``. An implicit equation
    gives ``"x - 6 = 52, so x = 58. The answer is 58."`` after checking that ``ans`` satisfies it.
    Raises ``ValueError`` saying why when the equation does not parse (``X=0.32=0.21``), uses anything but
    numbers, one unknown and + - * /, or disagrees with ``ans`` (see :func:`_agrees`).
    """
    text, eq, ans_raw = raw["original_text"], raw["equation"], raw["ans"]
    ans_text = ans_raw if isinstance(ans_raw, str) else repr(float(ans_raw))
    try:
        ans = float(ans_text)
    except ValueError:
        raise ValueError(f"ans {ans_raw!r} is not a number") from None
    sides = eq.split("=")
    if len(sides) != 2:
        raise ValueError(f"equation {eq!r} has {len(sides) - 1} '=' signs, expected 1")
    try:
        lhs, rhs = (ast.parse(s.strip(), mode="eval") for s in sides)
    except SyntaxError:
        raise ValueError(f"equation {eq!r} does not parse") from None
    try:
        lnames, rnames = _check_tree(lhs), _check_tree(rhs)
        unknowns = lnames | rnames
        if len({n.lower() for n in unknowns}) != 1:
            raise _BadEquation(f"expected one unknown, found {sorted(unknowns) or 'none'}")
        var = next(iter(unknowns)).lower()
        result = format_number(ans)
        if isinstance(lhs.body, ast.Name) and not rnames:  # explicit: x = <arithmetic>
            value = _evaluate(rhs, {})
            if not _agrees(value, ans, ans_text):
                raise _BadEquation(f"evaluates to {value:.6g}, but ans is {ans_text}")
            calc = "" if isinstance(rhs.body, ast.Constant) else f" = {_render(rhs)}"
            output = f"{var}{calc} = {result}. The answer is {result}."
        else:  # implicit (x - 6 = 52, rate problems): check that ans solves it
            env = {n: ans for n in unknowns}
            lv, rv = _evaluate(lhs, env), _evaluate(rhs, env)
            if abs(lv - rv) > 1e-3 * max(1.0, abs(lv), abs(rv)):
                raise _BadEquation(f"ans {ans_text} leaves the residual {lv - rv:.6g}")
            output = f"{_render(lhs)} = {_render(rhs)}, so {var} = {result}. The answer is {result}."
    except _BadEquation as e:
        raise ValueError(f"equation {eq!r}: {e}") from None
    return {"instruction": " ".join(text.split()), "input": "", "output": output, "answer": result}


def _mawps_records(data: list, path: Path) -> list[Record]:
    out, bad = [], []
    for i, rec in enumerate(data):
        where = f"record {i}"
        raw = {"original_text": _field(path, where, rec, "original_text"),
               "equation": _field(path, where, rec, "equation"),
               "ans": _field(path, where, rec, "ans", (int, float, str))}
        try:
            out.append(mawps_to_record(raw))
        except ValueError as e:
            bad.append(f"{where} (id {rec.get('id')}): {e}")
    if bad:
        log.warning("%s: dropped %d of %d MAWPS records whose equation is broken or contradicts 'ans' (kept %d); "
                    "first: %s", path, len(bad), len(data), len(out), "; ".join(bad[:3]))
    if not out:
        raise ValueError(f"{path}: no usable MAWPS record ({len(bad)} dropped)")
    return out


def load_mawps_train(path: str | Path) -> list[Record]:
    """Read MAWPS train format (JSON array of ``{id, original_text, segmented_text, equation, ans}``) -> Math10K
    records with equation rationales (:func:`mawps_to_record`). A missing or mistyped field raises
    ``ValueError`` naming file, index and field; records with a broken equation are dropped with a warning."""
    path = Path(path)
    return _mawps_records(_read_json_array(path), path)


# -------------------------------------------------------------------------------------- dispatch and mixing
FORMATS = ("llm-adapters", "gsm8k", "mawps")


def load_source(spec: str | Path | Mapping[str, Any]) -> list[Record]:
    """Load one training source: a path, or ``{"path": ..., "format": "llm-adapters" | "gsm8k" | "mawps"}``.

    Without ``format``: ``.jsonl`` is GSM8K; a ``.json`` array is MAWPS when its first record has
    ``original_text`` and ``equation``, otherwise LLM-Adapters.
    """
    fmt = None
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"path", "format"}
        if "path" not in spec or unknown:
            raise ValueError(f"a source spec is a path or {{'path': ..., 'format': ...}}, got keys {sorted(spec)}")
        path, fmt = Path(spec["path"]), spec.get("format")
    else:
        path = Path(spec)
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown source format {fmt!r} for {path}; choose one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"training source {path} not found")
    if fmt is None and path.suffix == ".jsonl":
        fmt = "gsm8k"
    if fmt == "gsm8k":
        return load_gsm8k_jsonl(path)
    if fmt is None and path.suffix != ".json":
        raise ValueError(f"cannot tell the format of {path} from its extension; pass {{'path': ..., 'format': one of "
                         f"{', '.join(FORMATS)}}}")
    data = _read_json_array(path)
    if fmt is None:
        first = data[0] if isinstance(data[0], dict) else {}
        fmt = "mawps" if "original_text" in first and "equation" in first else "llm-adapters"
    return _mawps_records(data, path) if fmt == "mawps" else _llm_adapters_records(data, path)


def _take(records: list[Record], amount: int | float | None, rng: random.Random) -> list[Record]:
    """``None``: all; an int ``n``: at most ``n`` drawn without replacement; a float ``w``: ``round(w * len)``
    records -- ``w <= 1`` subsamples, ``w > 1`` repeats the whole set ``int(w)`` times plus a sample."""
    if amount is None:
        return list(records)
    if isinstance(amount, bool) or not isinstance(amount, int | float) or amount < 0:
        raise ValueError(f"a source's amount must be None, an int max_n >= 0 or a float weight >= 0, got {amount!r}")
    if isinstance(amount, int):
        return rng.sample(records, min(amount, len(records)))
    k = round(amount * len(records))
    whole, rest = divmod(k, len(records))
    return list(records) * whole + rng.sample(records, rest)


def mix_sources(sources: Sequence[tuple[Sequence[Mapping[str, Any]], int | float | None]],
                seed: int = 0) -> datasets.Dataset:
    """Mix ``[(records, amount), ...]`` into one shuffled ``datasets.Dataset`` with columns ``FIELDS``.

    ``amount`` per source: ``None`` (all), an ``int`` maximum count (sampled without replacement) or a ``float``
    weight relative to the source's size (0.5: half of it, 2.0: every record twice). Deterministic for a seed.
    """
    import datasets

    rng = random.Random(seed)
    mixed: list[Record] = []
    for k, (records, amount) in enumerate(sources):
        if not records:
            raise ValueError(f"source {k} of mix_sources has no records")
        missing = next(((i, f) for i, r in enumerate(records) for f in _REQUIRED if f not in r), None)
        if missing:
            raise ValueError(f"source {k} of mix_sources: record {missing[0]} lacks field {missing[1]!r}")
        rows = [{f: r.get(f, "") if f == "input" else r[f] for f in FIELDS} for r in records]
        mixed += _take(rows, amount, rng)
    if not mixed:
        raise ValueError("mix_sources produced no records (no sources, or every amount was 0)")
    rng.shuffle(mixed)
    return datasets.Dataset.from_list(mixed)


# ---------------------------------------------------------------------------------------- test-set overlap
def _key(r: Mapping[str, Any]) -> str:
    return normalize_question(f"{r['instruction']} {r.get('input', '')}")


def find_test_overlap(train_records: Iterable[Mapping[str, Any]],
                      test_records_by_name: Mapping[str, Iterable[Mapping[str, Any]]]) -> dict[str, list[int]]:
    """``{test set name: indices of training records whose question is in that set}`` (only sets that overlap).
    Questions are compared by :func:`normalize_question` of ``instruction`` + ``input``."""
    train_keys = [_key(r) for r in train_records]
    overlap = {}
    for name, test in test_records_by_name.items():
        keys = {_key(r) for r in test}
        hits = [i for i, k in enumerate(train_keys) if k in keys]
        if hits:
            overlap[name] = hits
    return overlap


def check_no_test_overlap(train_records: Sequence[Mapping[str, Any]],
                          test_records_by_name: Mapping[str, Iterable[Mapping[str, Any]]]) -> None:
    """Raise ``ValueError`` if any training question appears in a test set (counts and an example in the message)."""
    overlap = find_test_overlap(train_records, test_records_by_name)
    if overlap:
        name, hits = next(iter(overlap.items()))
        counts = ", ".join(f"{n}: {len(h)}" for n, h in overlap.items())
        raise ValueError(f"training records overlap test sets ({counts} training records); e.g. record {hits[0]} "
                         f"{train_records[hits[0]]['instruction']!r:.100} is in {name}")


def load_test_sets(data_dir: str | Path, names: Sequence[str] = PAPER_TEST_SETS) -> dict[str, list[Record]]:
    """``{name: records of data_dir/<name>/test.json}`` (LLM-Adapters layout)."""
    data_dir = Path(data_dir)
    out = {}
    for name in names:
        path = data_dir / name / "test.json"
        if not path.is_file():
            raise FileNotFoundError(f"test set {path} not found; the overlap check needs it (pass test_sets=() to "
                                    f"skip the check, knowingly)")
        out[name] = load_llm_adapters_json(path)
    return out


def default_math_training_set(data_dir: str | Path, math10k_path: str | Path | None = None, seed: int = 0,
                              test_sets: Sequence[str] = PAPER_TEST_SETS, on_overlap: str = "drop"
                              ) -> datasets.Dataset:
    """The Math10K training set as a shuffled ``datasets.Dataset`` (columns ``FIELDS``).

    Uses ``math10k_path`` (default ``data_dir/ft-training_set/math_10k.json``) when that file exists; otherwise
    the documented substitute GSM8K train + MAWPS train from ``data_dir``, with a warning. Training questions
    found in ``data_dir/<name>/test.json`` for ``name`` in ``test_sets`` are dropped (``on_overlap="drop"``, with
    a logged count), rejected (``"error"``) or kept with a warning (``"keep"``: to reproduce a published set
    exactly). Records with an empty ``output`` (nothing to learn) are dropped with a logged count.
    """
    if on_overlap not in ("drop", "error", "keep"):
        raise ValueError(f"on_overlap must be 'drop', 'error' or 'keep', got {on_overlap!r}")
    data_dir = Path(data_dir)
    real = Path(math10k_path) if math10k_path is not None else data_dir / MATH10K_RELPATH
    if real.is_file():
        log.info("training set: %s", real)
        records = load_llm_adapters_json(real)
    else:
        gsm = load_gsm8k_jsonl(data_dir / GSM8K_TRAIN_RELPATH)
        mawps = load_mawps_train(data_dir / MAWPS_TRAIN_RELPATH)
        log.warning("math_10k.json not found at %s: using the documented substitute, GSM8K train (%d) + MAWPS train "
                    "(%d) from %s. It has no AQuA multiple-choice examples (Math10K has 1,000), so AQuA accuracy is "
                    "not comparable with the paper tables.", real, len(gsm), len(mawps), data_dir)
        records = gsm + mawps
    tests = load_test_sets(data_dir, test_sets)
    overlap = find_test_overlap(records, tests)
    if overlap:
        counts = ", ".join(f"{n}: {len(h)}" for n, h in overlap.items())
        if on_overlap == "error":
            check_no_test_overlap(records, tests)
        elif on_overlap == "keep":
            log.warning("keeping training records that are also test questions (%s)", counts)
        else:
            drop = {i for hits in overlap.values() for i in hits}
            records = [r for i, r in enumerate(records) if i not in drop]
            log.warning("dropped %d training records whose question is in a test set (%s)", len(drop), counts)
    empty = sum(not r["output"].strip() for r in records)
    if empty:
        records = [r for r in records if r["output"].strip()]
        log.warning("dropped %d training records with an empty output", empty)
    return mix_sources([(records, None)], seed=seed)
