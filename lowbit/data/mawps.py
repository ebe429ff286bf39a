"""MAWPS train format -> Math10K records, with a rationale written from each record's equation.

MAWPS train records (``dataset/mawps/trainset.json``) are ``{"id", "original_text", "segmented_text", "equation",
"ans"}`` with an equation such as ``"X=(9.0*4.0)"``. :func:`mawps_to_record` writes a one-line rationale from the
equation, ``"x = 9 * 4 = 36. The answer is 36."``, or, for an equation in implicit form,
``"x - 6 = 52, so x = 58. The answer is 58."``. Each equation is evaluated by a small AST evaluator (never
``eval``) and must agree with ``ans``; the 20 of 1,898 records of the shipped file whose equation is broken
(``X=0.32=0.21``) or contradicts ``ans`` (``x=1222-513`` with ``ans`` 208; ``x=40/7`` with ``ans`` 5, a floor the
equation does not say) are dropped with a logged count by :func:`load_mawps_train`.
"""

from __future__ import annotations

import ast
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .records import MAWPS_FIELDS, Record, check_field, format_number, read_json_array

log = logging.getLogger(__name__)

__all__ = ["load_mawps_train", "mawps_records", "mawps_to_record"]

class _BadEquation(ValueError):
    """An equation that cannot be turned into a rationale (the message says why)."""


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


def mawps_records(data: list, path: Path) -> list[Record]:
    """Already-parsed MAWPS train records -> Math10K records; records with a broken equation are dropped with a
    logged count, a missing or mistyped field raises. ``path`` only names the source in messages."""
    kinds = {"ans": (int, float, str)}  # the other fields are strings
    out, bad = [], []
    for i, rec in enumerate(data):
        where = f"record {i}"
        raw = {k: check_field(path, where, rec, k, kinds.get(k, str)) for k in MAWPS_FIELDS}
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
    return mawps_records(read_json_array(path), path)


def equation_rationales(records: list[Record], test_file: Path) -> list[Record]:
    """Reference responses for MAWPS test records, which ship none: MAWPS's own test split
    (``testset.json`` beside ``test.json``, the same problems in the same order) gives each problem's equation,
    turned into a rationale by :func:`mawps_to_record` (``"x = 3 - 1.17 = 1.83. The answer is 1.83."``).

    Records that already have an ``output`` are kept as they are; an equation that cannot be turned into a
    rationale leaves the record without one (the response loss skips and counts it). Raises ``ValueError`` when
    ``testset.json`` is missing or its problems do not match ``test.json``'s (naming the first mismatch).
    """
    src = Path(test_file).parent / "testset.json"
    if not src.is_file():
        raise ValueError(f"{test_file} has no reference rationales and {src} (MAWPS's own test split, whose "
                         f"equations give them) does not exist")
    raw = read_json_array(src)
    out = []
    for i, r in enumerate(records):
        if r.get("output", "").strip():
            out.append(r)
            continue
        if i >= len(raw) or " ".join(str(raw[i].get("original_text", "")).split()) != " ".join(
                r["instruction"].split()):
            raise ValueError(f"{src}: problem {i} does not match {test_file}'s ({r['instruction'][:60]!r}...)")
        try:
            out.append({**r, "output": mawps_to_record(raw[i])["output"]})
        except ValueError:
            out.append(r)
    return out
