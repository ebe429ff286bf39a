"""Test helpers that re-check generated arithmetic text independently of lowbit: equations re-evaluated with exact
fractions, the numbers stated in a text, and a content hash for pinning generated text."""

from __future__ import annotations

import hashlib
import json
import re
from fractions import Fraction

EQ = re.compile(r"(\d+)\s*([-+*/x×])\s*(\d+)\s*=\s*(\d+)")
NUM = re.compile(r"\d+(?:\.\d+)?")
ARITH = {
    "+": lambda a, b: Fraction(a) + b,
    "-": lambda a, b: Fraction(a) - b,
    "*": lambda a, b: Fraction(a) * b,
    "/": lambda a, b: Fraction(a) / b,
}


def equations(text: str) -> list[tuple[int, str, int, int]]:
    """Every ``a op b = c`` in ``text`` as ints."""
    return [(int(a), op, int(b), int(c)) for a, op, b, c in EQ.findall(text)]


def sha(obj) -> str:
    """SHA-256 of ``obj``'s JSON text (pins generated text byte for byte)."""
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()
