"""Synthetic arithmetic word problems in the Math10K record format, sized for a tiny LLaMA.

Why this exists
---------------
The real Math10K protocol (METHODS.md §4) needs a 7B model. For a tiny LLaMA (3–6M parameters, ~20 minutes of
CPU training) we generate look-alike data that such a model can actually learn, so that quantization and
adapter methods can be compared on a task where the full-precision model is well above chance.

Design, following the measured lessons of TINY-FEASIBILITY.md
-------------------------------------------------------------
* **Small numbers.** Every number stated in a problem (apart from the multiple-choice options) is an
  integer 2–20; multiplication and division are only by 2–5 (one factor of every product is 2–5, every
  divisor is 2–5 and every division is exact); every intermediate and final result is an integer in
  2–199. Full-range multi-digit arithmetic was measured to be out of reach at this size; this range was
  learnable (84.5% one-step, 56.5% multi-step after 12 minutes).
* **One equation per step.** Rationales are only equations ``"a op b = c."`` (``op`` in ``+ - * /``), each
  step reusing the previous result, then exactly ``"The answer is X."``. No prose, so the model spends its
  capacity on arithmetic and on choosing the operands.
* **Four families**, mirroring the four Math10K test sets:

  - ``mawps``: one operation, one step (add/take away/groups of/share equally/total/how many more).
  - ``gsm8k``: 2–3 operations told as a sequence of events; step ``i`` of the rationale is event ``i``.
  - ``svamp``: 1–2 operations plus SVAMP-style variations: an irrelevant sentence with a number (a different
    item or a person's age), the question asked first, facts in another order, inverse questions
    ("... Now she has 14 pens. How many pens did she have at first?") and comparisons
    ("Ben has 4 more pens than Ann"). The rationale ignores the distractor.
  - ``aqua``: a 1–2 step problem followed by ``Answer Choices: (A) .. (B) .. (C) .. (D) .. (E) ..`` (the
    AQuA layout); the options are distinct, sorted ascending, the correct value sits at a random position and
    the four distractors are within 8 of it. The multiple-choice run of TINY-FEASIBILITY.md stayed at chance
    because the model computed the value but did not find its letter, so the rationale states the value
    before the letter: ``"6 * 4 = 24. 24 is option (C). The answer is C."``. The aqua rationale holds no
    names, so the only capital A–E before the final sentence is the correct letter itself: the
    LLM-Adapters rule (first capital A–E in the response) and the stricter "answer is X" rule agree.

* **Variety with a small vocabulary**: 24 names, 16 items, several verbs and sentence templates per
  operation, so that a problem cannot be solved by memorising its surface, while the vocabulary stays at a
  few hundred words.
* **Determinism**: everything is drawn from ``random.Random`` instances seeded with strings (CPython seeds
  strings through SHA-512, independent of ``PYTHONHASHSEED``); JSON is written with ``indent=2``,
  ``ensure_ascii=False`` and atomically.
* **Pre-training text** (:func:`pretrain_corpus`): arithmetic facts, chained computations, option lists
  ("In the list (A) 21 (B) 24 ..., 24 is option (B).") and short stories built from the same sentence
  templates, whose results are stated as prose ("Now she has 17 pens."). It never uses the
  instruction/response layout nor "The answer is", and it never pairs a story with its equations: mapping a
  story to equations and to the answer format is left to fine-tuning.

Records are ``{"instruction", "input": "", "output", "answer"}`` with ``answer`` a plain integer string
("28") for the numeric families and a letter "A".."E" for aqua. :func:`check_record` re-verifies every
equation and the final answer.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lowbit.io import atomic_write_text

__all__ = [
    "FAMILIES",
    "TRAIN_MIX",
    "check_record",
    "generate_problem",
    "generate_split",
    "make_dataset",
    "pretrain_corpus",
    "problem_key",
    "rationale_answer",
]

FAMILIES = ("gsm8k", "svamp", "mawps", "aqua")
#: Share of each family in ``train.json``. The multi-step and multiple-choice families are the hard ones
#: (TINY-FEASIBILITY.md), so they get more examples than the one-step family.
TRAIN_MIX = {"gsm8k": 0.30, "svamp": 0.25, "mawps": 0.15, "aqua": 0.30}

MIN_OPERAND, MAX_OPERAND = 2, 20
FACTORS = (2, 3, 4, 5)
MAX_VALUE = 199
MIN_RESULT = 2  # no problem's step gives 0 or 1 ("keeps one pile" of 3 is degenerate)
LETTERS = "ABCDE"
ANSWER_CHOICES = " Answer Choices: "

FEMALE = ("Ann", "Mia", "Lucy", "Emma", "Sara", "Lily", "Nora", "Rosa", "Kate", "Zoe", "Ivy", "Jane")
MALE = ("Tom", "Sam", "Ben", "Max", "Leo", "Jack", "Paul", "Noah", "Omar", "Ravi", "Luke", "Tim")
PEOPLE = tuple((n, "she") for n in FEMALE) + tuple((n, "he") for n in MALE)
ITEMS = (
    ("apple", "apples"), ("pen", "pens"), ("book", "books"), ("card", "cards"), ("marble", "marbles"),
    ("sticker", "stickers"), ("cookie", "cookies"), ("shell", "shells"), ("stamp", "stamps"),
    ("toy car", "toy cars"), ("flower", "flowers"), ("egg", "eggs"), ("coin", "coins"),
    ("pencil", "pencils"), ("orange", "oranges"), ("balloon", "balloons"),
)  # fmt: skip

_EQ = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
_FINAL = re.compile(r"The answer is (\S+?)\.\s*$")
_OPTION = re.compile(r"\(([A-E])\) (\d+)")
_OPS: dict[str, Callable[[int, int], int | None]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a // b if b and a % b == 0 else None,
}


# ----------------------------------------------------------------------------------------------- helpers
@dataclass
class _Person:
    name: str
    pron: str  # she / he

    def subj(self, rng: random.Random, p_pron: float = 0.5) -> str:
        return self.pron if rng.random() < p_pron else self.name


@dataclass
class _Problem:
    """A word problem under construction: its sentences, its equations and its current value."""

    facts: list[str] = field(default_factory=list)
    question: str = ""
    steps: list[tuple[int, str, int, int]] = field(default_factory=list)
    value: int = 0

    def step(self, a: int, op: str, b: int) -> int:
        c = _OPS[op](a, b)
        assert c is not None and 0 <= c <= MAX_VALUE, (a, op, b, c)
        self.steps.append((a, op, b, c))
        self.value = c
        return c

    def equations(self) -> str:
        return " ".join(f"{a} {op} {b} = {c}." for a, op, b, c in self.steps)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _n(n: int, item: tuple[str, str]) -> str:
    return f"{n} {item[0] if n == 1 else item[1]}"


def _people(rng: random.Random, k: int) -> list[_Person]:
    return [_Person(*p) for p in rng.sample(PEOPLE, k)]


def _items(rng: random.Random, k: int) -> list[tuple[str, str]]:
    return rng.sample(ITEMS, k)


def _operand(rng: random.Random, hi: int = MAX_OPERAND) -> int:
    return rng.randint(MIN_OPERAND, hi)


def _then(rng: random.Random, sentence: str) -> str:
    """Optionally prefix an event sentence with a connective (lower-casing a leading pronoun)."""
    r = rng.random()
    if r < 0.35:
        return sentence
    conn = "Then" if r < 0.75 else "After that,"
    first, rest = sentence.split(" ", 1)
    if first in ("She", "He", "The"):
        first = first.lower()
    return f"{conn} {first} {rest}"


# ------------------------------------------------------------------------------------------ event steps
def _feasible_ops(cur: int) -> list[str]:
    ops = []
    if cur + MIN_OPERAND <= MAX_VALUE:
        ops.append("+")
    if cur >= MIN_OPERAND + MIN_RESULT:
        ops.append("-")
    if cur * 2 <= MAX_VALUE:
        ops.append("*")
    if any(cur % k == 0 and cur // k >= MIN_RESULT for k in FACTORS):
        ops.append("/")
    return ops


_OP_WEIGHT = {"+": 3, "-": 3, "*": 2, "/": 2}


def _event(rng: random.Random, pb: _Problem, p: _Person, q: _Person, item, op: str) -> str:
    """Apply ``op`` to the current value and return the sentence telling it (story order = equation order)."""
    cur = pb.value
    s = _cap(p.subj(rng))
    items = item[1]
    if op == "+":
        b = _operand(rng, min(MAX_OPERAND, MAX_VALUE - cur))
        pb.step(cur, "+", b)
        return rng.choice(
            [
                f"{s} buys {b} more {items}.",
                f"{s} finds {b} more {items}.",
                f"{s} gets {b} more {items} from {q.name}.",
                f"{q.name} gives {p.name} {b} more {items}.",
                f"{s} picks up {b} more {items}.",
            ]
        )
    if op == "-":
        b = _operand(rng, min(MAX_OPERAND, cur - MIN_RESULT))
        pb.step(cur, "-", b)
        return rng.choice(
            [
                f"{s} gives {b} {items} to {q.name}.",
                f"{s} sells {b} {items}.",
                f"{s} loses {b} {items}.",
                f"{s} uses {b} of the {items}.",
                f"{q.name} takes {b} {items} from {p.name}.",
            ]
        )
    if op == "*":
        k = rng.choice([k for k in FACTORS if cur * k <= MAX_VALUE])
        pb.step(cur, "*", k)
        return rng.choice(
            [
                f"{s} ends up with {k} times as many {items} as before.",
                f"The number of {items} {p.subj(rng)} has becomes {k} times as large.",
                f"{s} collects more {items} until {p.pron} has {k} times as many as before.",
            ]
        )
    k = rng.choice([k for k in FACTORS if cur % k == 0 and cur // k >= MIN_RESULT])
    pb.step(cur, "/", k)
    return rng.choice(
        [
            f"{s} splits the {items} into {k} equal piles and keeps one pile.",
            f"{s} puts the {items} equally into {k} boxes and keeps one box.",
            f"{s} divides the {items} into {k} equal groups and keeps one group.",
        ]
    )


def _groups(rng: random.Random, pb: _Problem, p: _Person, item) -> str:
    """``a`` containers of ``k`` items (one of the two is 2–5): one multiplication."""
    a, k = _operand(rng), rng.choice(FACTORS)
    if rng.random() < 0.5:
        a, k = k, a
    pb.step(a, "*", k)
    container = rng.choice(["bags", "boxes", "jars", "baskets"])
    return rng.choice(
        [
            f"{p.name} has {a} {container} with {k} {item[1]} in each one.",
            f"{p.name} buys {a} {container} of {item[1]}. Each one holds {k} {item[1]}.",
        ]
    )


def _start(rng: random.Random, pb: _Problem, p: _Person, item, allow_mul: bool = True) -> str:
    """The opening fact: a plain amount, or ``a`` groups of ``k`` (one equation)."""
    if allow_mul and rng.random() < 0.3:
        return _groups(rng, pb, p, item)
    a = _operand(rng)
    pb.value = a
    return rng.choice(
        [
            f"{p.name} has {a} {item[1]}.",
            f"{p.name} starts with {a} {item[1]}.",
            f"{p.name} owns {a} {item[1]}.",
            f"There are {a} {item[1]} in {p.name}'s bag.",
        ]
    )


def _question_now(rng: random.Random, p: _Person, item) -> str:
    return rng.choice(
        [
            f"How many {item[1]} does {p.name} have now?",
            f"How many {item[1]} does {p.name} have in the end?",
            f"How many {item[1]} does {p.name} have at the end?",
        ]
    )


def _chain(rng: random.Random, n_ops: int) -> tuple[_Problem, _Person, tuple[str, str]]:
    """A story of ``n_ops`` operations: opening fact, then events, each step reusing the previous value."""
    p, q = _people(rng, 2)
    (item,) = _items(rng, 1)
    pb = _Problem()
    pb.facts.append(_start(rng, pb, p, item, allow_mul=n_ops >= 2))
    while len(pb.steps) < n_ops:
        ops = _feasible_ops(pb.value)
        op = rng.choices(ops, weights=[_OP_WEIGHT[o] for o in ops])[0]
        sentence = _event(rng, pb, p, q, item, op)
        pb.facts.append(_then(rng, sentence) if len(pb.facts) > 1 else sentence)
    pb.question = _question_now(rng, p, item)
    return pb, p, item


def _one_step(rng: random.Random) -> _Problem:
    """A MAWPS-like one-operation problem."""
    p, q = _people(rng, 2)
    (item,) = _items(rng, 1)
    it = item[1]
    pb = _Problem()
    kind = rng.choice(["event", "event", "groups", "share", "total", "more"])
    if kind == "event":
        pb.facts.append(_start(rng, pb, p, item, allow_mul=False))
        ops = [o for o in ("+", "-", "*") if o in _feasible_ops(pb.value)]
        op = rng.choices(ops, weights=[{"+": 4, "-": 4, "*": 1}[o] for o in ops])[0]
        pb.facts.append(_event(rng, pb, p, q, item, op))
        pb.question = _question_now(rng, p, item)
    elif kind == "groups":
        pb.facts.append(_groups(rng, pb, p, item))
        pb.question = rng.choice([f"How many {it} does {p.name} have in total?", f"How many {it} does {p.name} have?"])
    elif kind == "share":
        k = rng.choice(FACTORS)
        a = k * rng.randint(MIN_RESULT, MAX_OPERAND // k)
        pb.step(a, "/", k)
        fact, question = rng.choice(
            [
                (f"{p.name} has {a} {it} and puts them equally into {k} boxes.",
                 f"How many {it} are in each box?"),
                (f"{p.name} shares {a} {it} equally among {k} friends.",
                 f"How many {it} does each friend get?"),
                (f"{p.name} splits {a} {it} into {k} equal piles.",
                 f"How many {it} are in each pile?"),
            ]
        )  # fmt: skip
        pb.facts.append(fact)
        pb.question = question
    elif kind == "total":
        a, b = _operand(rng), _operand(rng)
        pb.step(a, "+", b)
        pb.facts.append(f"{p.name} has {a} {it} and {q.name} has {b} {it}.")
        pb.question = rng.choice(
            [
                f"How many {it} do they have in total?",
                f"How many {it} do {p.name} and {q.name} have together?",
            ]
        )
    else:  # more
        b = _operand(rng, MAX_OPERAND - MIN_RESULT)
        a = rng.randint(b + MIN_RESULT, MAX_OPERAND)
        pb.step(a, "-", b)
        pb.facts += [f"{p.name} has {a} {it}.", f"{q.name} has {b} {it}."]
        pb.question = f"How many more {it} does {p.name} have than {q.name}?"
    return pb


def _distractor(rng: random.Random, p: _Person, avoid: Iterable[str], item, third_person: bool = True) -> str:
    """A sentence with a number that the question does not need (another item, an age, a third person)."""
    other_item = rng.choice([x for x in ITEMS if x != item])[1]
    d = _operand(rng)
    forms = [
        f"{p.name} also has {d} {other_item}.",
        f"{p.name} is {d} years old.",
        f"There are {d} {other_item} on the table.",
        f"{p.name} has {d} {other_item} at home.",
    ]
    if third_person:
        r = rng.choice([x for x in PEOPLE if x[0] not in set(avoid)])[0]
        forms.append(f"{r} has {d} {other_item}.")
    return rng.choice(forms)


def _svamp(rng: random.Random) -> _Problem:
    """SVAMP-like: 1–2 operations, a distractor and/or reordered or inverse phrasing."""
    p, q = _people(rng, 2)
    (item,) = _items(rng, 1)
    it = item[1]
    kind = rng.choice(["inverse_add", "inverse_sub", "compare", "compare_total", "chain1", "chain2", "total"])
    pb = _Problem()
    reorder_ok = True
    if kind == "inverse_add":  # bought b, now has c -> had c - b
        b = _operand(rng, MAX_OPERAND - MIN_RESULT)
        c = rng.randint(b + MIN_RESULT, MAX_OPERAND)
        pb.step(c, "-", b)
        verb = rng.choice(["buys", "finds", "gets"])
        pb.facts += [f"{p.name} {verb} {b} more {it}.", f"Now {p.pron} has {c} {it}."]
        pb.question = f"How many {it} did {p.name} have at first?"
        reorder_ok = False
    elif kind == "inverse_sub":  # gave away b, now has c -> had c + b
        b, c = _operand(rng), _operand(rng)
        pb.step(c, "+", b)
        pb.facts += [
            rng.choice([f"{p.name} gives {b} {it} to {q.name}.", f"{p.name} sells {b} {it}."]),
            f"Now {p.pron} has {c} {it}.",
        ]
        pb.question = f"How many {it} did {p.name} have at first?"
        reorder_ok = False
    elif kind in ("compare", "compare_total"):
        a = _operand(rng)
        if rng.random() < 0.5:
            b = _operand(rng)
            pb.step(a, "+", b)
            rel = f"{q.name} has {b} more {it} than {p.name}."
        else:
            a = rng.randint(MIN_OPERAND + MIN_RESULT, MAX_OPERAND)
            b = _operand(rng, a - MIN_RESULT)
            pb.step(a, "-", b)
            rel = f"{q.name} has {b} fewer {it} than {p.name}."
        pb.facts += [f"{p.name} has {a} {it}.", rel]
        if kind == "compare":
            pb.question = f"How many {it} does {q.name} have?"
        else:
            pb.step(a, "+", pb.value)
            pb.question = f"How many {it} do {p.name} and {q.name} have together?"
        reorder_ok = False
    elif kind == "total":  # facts in another order: equation follows the text order
        a, b = _operand(rng), _operand(rng)
        pb.step(a, "+", b)
        pb.facts += [f"{q.name} has {a} {it}.", f"{p.name} has {b} {it}."]
        pb.question = f"How many {it} do {p.name} and {q.name} have together?"
    else:
        pb, p, item = _chain(rng, 1 if kind == "chain1" else 2)
    # Names instead of pronouns: a distractor about a third person or a question asked first would make a
    # pronoun ambiguous or make it precede the name.
    pb.facts = [re.sub(r"\b(?:[Ss]he|[Hh]e)\b", p.name, f) for f in pb.facts]
    question_first = reorder_ok and rng.random() < 0.5
    if not question_first or rng.random() < 0.7:
        # the story opens with the person it is about unless the question comes first
        pos = rng.randint(0 if question_first else 1, len(pb.facts))
        sentence = _distractor(rng, p, (p.name, q.name), item)
        if pos <= 1:  # nothing about the person has been said yet
            sentence = sentence.replace(" also has ", " has ")
        pb.facts.insert(pos, sentence)
    if question_first:
        pb.facts.insert(0, pb.question)
        pb.question = ""
    return pb


def _options(rng: random.Random, value: int) -> tuple[list[int], int]:
    """Five distinct sorted options within 8 of ``value``; returns (options, index of ``value``)."""
    below = list(range(max(0, value - 8), value))
    above = list(range(value + 1, min(MAX_VALUE, value + 8) + 1))
    positions = [i for i in range(5) if i <= len(below) and 4 - i <= len(above)]
    pos = rng.choice(positions)
    opts = sorted(rng.sample(below, pos)) + [value] + sorted(rng.sample(above, 4 - pos))
    return opts, pos


def _text(pb: _Problem) -> str:
    return " ".join(pb.facts + ([pb.question] if pb.question else []))


def generate_problem(family: str, rng: random.Random) -> dict:
    """One record ``{"instruction", "input": "", "output", "answer"}`` of ``family`` drawn from ``rng``."""
    if family == "mawps":
        pb = _one_step(rng)
    elif family == "gsm8k":
        pb, _, _ = _chain(rng, rng.choice([2, 3]))
    elif family == "svamp":
        pb = _svamp(rng)
    elif family == "aqua":
        pb = _one_step(rng) if rng.random() < 0.5 else _chain(rng, 2)[0]
        opts, pos = _options(rng, pb.value)
        letter = LETTERS[pos]
        choices = " ".join(f"({L}) {v}" for L, v in zip(LETTERS, opts))
        return {
            "instruction": _text(pb) + ANSWER_CHOICES + choices,
            "input": "",
            "output": f"{pb.equations()} {pb.value} is option ({letter}). The answer is {letter}.",
            "answer": letter,
        }
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return {
        "instruction": _text(pb),
        "input": "",
        "output": f"{pb.equations()} The answer is {pb.value}.",
        "answer": str(pb.value),
    }


# --------------------------------------------------------------------------------------- record checks
def rationale_answer(output: str) -> str | None:
    """``X`` of the final sentence ``"The answer is X."`` (parentheses around a letter removed), else None."""
    m = _FINAL.search(output)
    if m is None:
        return None
    return m.group(1).strip("()")


def problem_key(instruction: str) -> str:
    """The problem stem: the instruction without its multiple-choice suffix (train/test disjointness key)."""
    return instruction.split(ANSWER_CHOICES, 1)[0]


def check_record(rec: dict) -> None:
    """Raise ``ValueError`` unless ``rec`` is a well-formed record whose rationale is consistent.

    Every equation ``a op b = c`` in the output must hold in integer arithmetic (division exact), the
    output must end with ``"The answer is X."`` and ``X`` must equal ``rec["answer"]``. Numeric records: the
    answer is the last computed value. Multiple-choice records (options ``(A) v`` in the instruction): the
    answer letter must hold the last computed value, and ``"v is option (L)"`` in the rationale must name the
    same letter.
    """
    if set(rec) != {"instruction", "input", "output", "answer"}:
        raise ValueError(f"keys {sorted(rec)}")
    if not all(isinstance(v, str) for v in rec.values()):
        raise ValueError("non-string field")
    out = rec["output"]
    eqs = _EQ.findall(out)
    if not eqs:
        raise ValueError(f"no equation in {out!r}")
    for a, op, b, c in eqs:
        if _OPS[op](int(a), int(b)) != int(c):
            raise ValueError(f"wrong equation {a} {op} {b} = {c}")
    last = int(eqs[-1][3])
    final = rationale_answer(out)
    if final is None:
        raise ValueError(f"no final 'The answer is X.' in {out!r}")
    if final != rec["answer"]:
        raise ValueError(f"rationale concludes {final!r}, answer field is {rec['answer']!r}")
    options = dict(_OPTION.findall(rec["instruction"]))
    if options:
        if sorted(options) != list(LETTERS):
            raise ValueError(f"options {sorted(options)}")
        if final not in options or int(options[final]) != last:
            raise ValueError(f"option {final} is {options.get(final)}, rationale computed {last}")
        m = re.search(r"(\d+) is option \(([A-E])\)", out)
        if m is None or int(m.group(1)) != last or m.group(2) != final:
            raise ValueError("rationale does not state 'v is option (L)' for the answer")
    elif final != str(last):
        raise ValueError(f"rationale computed {last}, concludes {final}")


# ------------------------------------------------------------------------------------------ splits/files
def _rng(*parts) -> random.Random:
    return random.Random("lowbit.data.synthetic:" + ":".join(map(str, parts)))


def generate_split(family: str, n: int, seed: int, exclude: Iterable[str] = frozenset()) -> list[dict]:
    """``n`` problems of ``family`` with distinct stems (see :func:`problem_key`), none excluded.

    A problem is skipped when its stem equals the stem of an instruction in ``exclude`` (so an aqua problem is
    never reused with different options); the same ``(family, n, seed, exclude)`` gives the same list."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    rng = _rng("split", family, seed)
    seen = {problem_key(e) for e in exclude}
    out: list[dict] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise RuntimeError(f"could not draw {n} distinct {family} problems")
        rec = generate_problem(family, rng)
        key = problem_key(rec["instruction"])
        if key in seen:
            continue
        seen.add(key)
        out.append(rec)
    return out


def test_split(family: str, n: int, seed: int = 0) -> list[dict]:
    """The first ``n`` test problems of ``family`` for dataset seed ``seed`` — the records
    ``make_dataset(seed=seed, n_test=n)`` writes to ``test/{family}.json`` (a longer split extends a shorter one)."""
    return generate_split(family, n, seed * 1000 + 1)


def _dumps(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def train_split(n_train: int = 10000, seed: int = 0, n_test: int = 500) -> list[dict]:
    """The shuffled training records of dataset seed ``seed`` (all families mixed per :data:`TRAIN_MIX`): the
    ``train.json`` that :func:`make_dataset` writes. Every test stem of the first ``n_test`` test problems per
    family is excluded, and no stem occurs twice."""
    tests = {f: test_split(f, n_test, seed) for f in FAMILIES}
    exclude = {problem_key(r["instruction"]) for recs in tests.values() for r in recs}
    counts = {f: int(round(n_train * TRAIN_MIX[f])) for f in FAMILIES}
    counts["gsm8k"] += n_train - sum(counts.values())
    train: list[dict] = []
    for f in FAMILIES:
        recs = generate_split(f, counts[f], seed * 1000 + 2, exclude=exclude)
        exclude |= {problem_key(r["instruction"]) for r in recs}  # no stem twice across families either
        train += recs
    _rng("shuffle", seed).shuffle(train)
    return train


def make_dataset(out_dir: str | Path, seed: int = 0, n_train: int = 10000, n_test: int = 500) -> dict[str, Path]:
    """Write ``train.json`` (:func:`train_split`) and ``test/{family}.json`` (:func:`test_split`).

    Test problems are drawn first; training problems exclude every test stem, and no stem occurs twice in
    ``train.json``. Returns
    ``{"train": path, "gsm8k": path, "svamp": path, "mawps": path, "aqua": path}``.
    """
    out_dir = Path(out_dir)
    paths = {"train": out_dir / "train.json"}
    atomic_write_text(paths["train"], _dumps(train_split(n_train, seed, n_test)))
    for f in FAMILIES:
        paths[f] = out_dir / "test" / f"{f}.json"
        atomic_write_text(paths[f], _dumps(test_split(f, n_test, seed)))
    return paths


# ---------------------------------------------------------------------------------------- pre-training
def _fact(rng: random.Random, big: bool) -> tuple[int, str, int, int]:
    """One true equation in the problem range; ``big`` draws the left operand up to 199 (as in chains)."""
    op = rng.choices(["+", "-", "*", "/"], weights=[3, 3, 2, 2])[0]
    hi = MAX_VALUE if big else MAX_OPERAND
    while True:
        if op == "+":
            a = rng.randint(0, hi)
            b = rng.randint(0, min(MAX_OPERAND, MAX_VALUE - a))
        elif op == "-":
            a = rng.randint(0, hi)
            b = rng.randint(0, min(MAX_OPERAND, a))
        elif op == "*":
            k = rng.choice((1,) + FACTORS)
            a = rng.randint(0, min(hi, MAX_VALUE // k))
            a, b = (a, k) if rng.random() < 0.7 else (k, a)
        else:
            k = rng.choice((1,) + FACTORS)
            a, b = k * rng.randint(0, min(hi, MAX_VALUE) // k), k
        c = _OPS[op](a, b)
        if c is not None and 0 <= c <= MAX_VALUE:
            return a, op, b, c


def _story_prose(rng: random.Random) -> str:
    """A story from the problem templates with every result stated in prose (no equations, no question)."""
    p, q = _people(rng, 2)
    (item,) = _items(rng, 1)
    pb = _Problem()
    sentences = [_start(rng, pb, p, item)]
    if pb.steps:
        sentences.append(f"So {p.pron} has {_n(pb.value, item)}.")
    for _ in range(rng.randint(1, 3)):
        ops = _feasible_ops(pb.value)
        op = rng.choices(ops, weights=[_OP_WEIGHT[o] for o in ops])[0]
        sentences.append(_then(rng, _event(rng, pb, p, q, item, op)))
        sentences.append(rng.choice([f"Now {p.pron} has {_n(pb.value, item)}.",
                                     f"{p.name} now has {_n(pb.value, item)}."]))  # fmt: skip
    if rng.random() < 0.3:
        pos = rng.randint(1, len(sentences))
        sentences.insert(pos, _distractor(rng, p, (p.name, q.name), item, third_person=False))
    return " ".join(sentences)


def _story_relations(rng: random.Random) -> str:
    """Totals, differences, sharing and comparisons told as prose with their results."""
    p, q = _people(rng, 2)
    (item,) = _items(rng, 1)
    it = item[1]
    a, b = _operand(rng), _operand(rng)
    kind = rng.choice(["total", "more", "fewer", "share", "before"])
    if kind == "total":
        return f"{p.name} has {a} {it} and {q.name} has {b} {it}. Together they have {_n(a + b, item)}."
    if kind == "more":
        return f"{p.name} has {a} {it}. {q.name} has {b} more {it} than {p.name}, so {q.name} has {a + b} {it}."
    if kind == "fewer":
        a, b = max(a, b) + 1, min(a, b)
        return (f"{p.name} has {a} {it}. {q.name} has {b} fewer {it} than {p.name}, "
                f"so {q.name} has {_n(a - b, item)}.")  # fmt: skip
    if kind == "share":
        k = rng.choice(FACTORS)
        return f"{p.name} shares {k * a} {it} equally among {k} friends. Each friend gets {_n(a, item)}."
    return f"{p.name} had {a} {it} and got {b} more. Now {p.pron} has {a + b} {it}, {b} more than before."


def _option_list(rng: random.Random) -> str:
    value = rng.randint(0, MAX_VALUE)
    opts, pos = _options(rng, value)
    listing = " ".join(f"({L}) {v}" for L, v in zip(LETTERS, opts))
    i = rng.randrange(5)
    return rng.choice(
        [
            f"In the list {listing}, {value} is option ({LETTERS[pos]}).",
            f"Options: {listing}. Option ({LETTERS[i]}) is {opts[i]}. {value} is option ({LETTERS[pos]}).",
            f"{listing}. {opts[i]} is option ({LETTERS[i]}).",
        ]
    )


def pretrain_corpus(n: int, seed: int) -> list[str]:
    """``n`` short documents of general synthetic text for pre-training a base model.

    Kinds (by share): arithmetic facts ``"7 + 5 = 12."`` (25%), chained computations (20%), stories with
    results in prose (30%), relation stories (15%), option lists (10%). Never in instruction/response
    layout, never "### Instruction" nor "The answer is".
    """
    rng = _rng("pretrain", seed)
    docs = []
    kinds = ["facts", "chain", "story", "relation", "options"]
    weights = [25, 20, 30, 15, 10]
    for _ in range(n):
        kind = rng.choices(kinds, weights=weights)[0]
        if kind == "facts":
            k = rng.randint(3, 8)
            big = rng.random() < 0.5
            doc = " ".join(f"{a} {op} {b} = {c}." for a, op, b, c in (_fact(rng, big) for _ in range(k)))
        elif kind == "chain":
            pb = _Problem()
            pb.value = _operand(rng)
            for _ in range(rng.randint(2, 4)):
                ops = _feasible_ops(pb.value)
                op = rng.choices(ops, weights=[_OP_WEIGHT[o] for o in ops])[0]
                cur = pb.value
                if op == "+":
                    pb.step(cur, op, _operand(rng, min(MAX_OPERAND, MAX_VALUE - cur)))
                elif op == "-":
                    pb.step(cur, op, _operand(rng, min(MAX_OPERAND, cur - MIN_RESULT)))
                elif op == "*":
                    pb.step(cur, op, rng.choice([k for k in FACTORS if cur * k <= MAX_VALUE]))
                else:
                    pb.step(cur, op, rng.choice([k for k in FACTORS if cur % k == 0 and cur // k >= MIN_RESULT]))
            doc = pb.equations()
        elif kind == "story":
            doc = _story_prose(rng)
        elif kind == "relation":
            doc = _story_relations(rng)
        else:
            doc = _option_list(rng)
        docs.append(doc)
    return docs


def worked_problem_text(rec: dict) -> str:
    """A record as plain prose — the problem, then its equations and the result — as worked examples appear in
    web text: no ``### Instruction`` layout and no "The answer is" cue (fine-tuning teaches those)."""
    body = rec["output"]
    final = body.rfind("The answer is")
    steps = body[:final].strip()
    if rec["answer"] in "ABCDE":
        return f"{rec['instruction']} {steps}"  # ends with "v is option (X)."
    return f"{rec['instruction']} {steps} So the result is {rec['answer']}."


def worked_corpus(n: int, seed: int, exclude_seed: int = 0, n_test: int = 500) -> list[str]:
    """``n`` worked problems of all four families in prose (:func:`worked_problem_text`), never one whose stem is
    in the synthetic test split of ``make_dataset(seed=exclude_seed, n_test=n_test)`` (checked by stem)."""
    exclude = {problem_key(r["instruction"]) for f in FAMILIES for r in test_split(f, n_test, exclude_seed)}
    per = -(-n // len(FAMILIES))
    docs = [worked_problem_text(r) for f in FAMILIES
            for r in generate_split(f, per, seed * 7919 + 5, exclude=exclude)]
    _rng("worked-shuffle", seed).shuffle(docs)
    return docs[:n]
