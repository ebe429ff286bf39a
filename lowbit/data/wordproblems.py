"""Sentence-building blocks of the synthetic arithmetic word problems: people, items, events, number ranges.

Shared by the task families (:mod:`lowbit.data.synthetic`) and the tiny model's pre-training corpus
(:mod:`lowbit.models.tiny.corpus`). A :class:`Problem` collects sentences and the equations they imply; every builder
draws from a ``random.Random`` and applies its operation to ``Problem.value`` with :meth:`Problem.step`, so that the
story order is the equation order.

Number ranges: every number stated in a problem (apart from multiple-choice options) is an integer 2-20;
multiplication and division are only by 2-5 (one factor of every product is 2-5, every divisor is 2-5 and every
division is exact); every intermediate and final result is an integer in 2-199. The vocabulary is small (24
names, 16 items, a few verbs and templates per operation) so that a tiny model can learn it, yet varied enough
that a problem cannot be solved by memorising its surface.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

__all__ = [
    "FACTORS", "ITEMS", "LETTERS", "MAX_OPERAND", "MAX_VALUE", "MIN_OPERAND", "MIN_RESULT", "OPS", "OP_WEIGHTS",
    "PEOPLE", "Person", "Problem", "apply_event", "chain_story", "count_of", "distractor", "draw_items",
    "draw_operand", "draw_options", "draw_people", "feasible_ops", "groups_fact", "opening_fact", "question_now",
    "seeded_rng", "with_connective",
]

MIN_OPERAND, MAX_OPERAND = 2, 20  # the numbers stated in a problem
FACTORS = (2, 3, 4, 5)  # every multiplication has one of these as a factor; every division is by one
MAX_VALUE = 199  # the largest intermediate or final result
MIN_RESULT = 2  # no problem's step gives 0 or 1 ("keeps one pile" of 3 is degenerate)
LETTERS = "ABCDE"  # multiple-choice option letters

FEMALE = ("Ann", "Mia", "Lucy", "Emma", "Sara", "Lily", "Nora", "Rosa", "Kate", "Zoe", "Ivy", "Jane")
MALE = ("Tom", "Sam", "Ben", "Max", "Leo", "Jack", "Paul", "Noah", "Omar", "Ravi", "Luke", "Tim")
PEOPLE = tuple((n, "she") for n in FEMALE) + tuple((n, "he") for n in MALE)
ITEMS = (
    ("apple", "apples"), ("pen", "pens"), ("book", "books"), ("card", "cards"), ("marble", "marbles"),
    ("sticker", "stickers"), ("cookie", "cookies"), ("shell", "shells"), ("stamp", "stamps"),
    ("toy car", "toy cars"), ("flower", "flowers"), ("egg", "eggs"), ("coin", "coins"),
    ("pencil", "pencils"), ("orange", "oranges"), ("balloon", "balloons"),
)  # fmt: skip

#: The four operations; division gives None unless exact.
OPS: dict[str, Callable[[int, int], int | None]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a // b if b and a % b == 0 else None,
}


def seeded_rng(*parts) -> random.Random:
    """A ``random.Random`` seeded with the string ``"lowbit.data.synthetic:" + ":".join(parts)``.

    CPython seeds strings through SHA-512, independent of ``PYTHONHASHSEED``, so the same parts give the same
    draws on every run. The prefix is part of the seed: changing it changes every generated problem and document.
    """
    return random.Random("lowbit.data.synthetic:" + ":".join(map(str, parts)))


# ----------------------------------------------------------------------------------------------- helpers
@dataclass
class Person:
    """A person of a story: name and pronoun."""

    name: str
    pron: str  # she / he

    def subj(self, rng: random.Random, p_pron: float = 0.5) -> str:
        """The subject of a sentence: the pronoun with probability ``p_pron``, else the name."""
        return self.pron if rng.random() < p_pron else self.name


@dataclass
class Problem:
    """A word problem under construction: its sentences, its equations and its current value."""

    facts: list[str] = field(default_factory=list)
    question: str = ""
    steps: list[tuple[int, str, int, int]] = field(default_factory=list)
    value: int = 0

    def step(self, a: int, op: str, b: int) -> int:
        """Record the equation ``a op b = c`` and make ``c`` the current value."""
        c = OPS[op](a, b)
        assert c is not None and 0 <= c <= MAX_VALUE, (a, op, b, c)
        self.steps.append((a, op, b, c))
        self.value = c
        return c

    def equations(self) -> str:
        """The rationale: ``"a op b = c."`` per step, space-separated."""
        return " ".join(f"{a} {op} {b} = {c}." for a, op, b, c in self.steps)


def _cap(s: str) -> str:
    """``s`` with its first letter upper-cased."""
    return s[:1].upper() + s[1:]


def count_of(n: int, item: tuple[str, str]) -> str:
    """``"1 apple"``, ``"3 apples"``."""
    return f"{n} {item[0] if n == 1 else item[1]}"


def draw_people(rng: random.Random, k: int) -> list[Person]:
    """``k`` distinct people."""
    return [Person(*p) for p in rng.sample(PEOPLE, k)]


def draw_items(rng: random.Random, k: int) -> list[tuple[str, str]]:
    """``k`` distinct items, each ``(singular, plural)``."""
    return rng.sample(ITEMS, k)


def draw_operand(rng: random.Random, hi: int = MAX_OPERAND) -> int:
    """A stated number in ``MIN_OPERAND..hi``."""
    return rng.randint(MIN_OPERAND, hi)


def with_connective(rng: random.Random, sentence: str) -> str:
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
def feasible_ops(cur: int) -> list[str]:
    """The operations that keep the result of a step on ``cur`` within the number ranges."""
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


#: How often each operation is drawn for an event step.
OP_WEIGHTS = {"+": 3, "-": 3, "*": 2, "/": 2}


def apply_event(rng: random.Random, pb: Problem, p: Person, q: Person, item, op: str) -> str:
    """Apply ``op`` to the current value and return the sentence telling it (story order = equation order)."""
    cur = pb.value
    s = _cap(p.subj(rng))
    items = item[1]
    if op == "+":
        b = draw_operand(rng, min(MAX_OPERAND, MAX_VALUE - cur))
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
        b = draw_operand(rng, min(MAX_OPERAND, cur - MIN_RESULT))
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


def groups_fact(rng: random.Random, pb: Problem, p: Person, item) -> str:
    """``a`` containers of ``k`` items (one of the two is 2–5): one multiplication."""
    a, k = draw_operand(rng), rng.choice(FACTORS)
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


def opening_fact(rng: random.Random, pb: Problem, p: Person, item, allow_mul: bool = True) -> str:
    """The opening fact: a plain amount, or ``a`` groups of ``k`` (one equation)."""
    if allow_mul and rng.random() < 0.3:
        return groups_fact(rng, pb, p, item)
    a = draw_operand(rng)
    pb.value = a
    return rng.choice(
        [
            f"{p.name} has {a} {item[1]}.",
            f"{p.name} starts with {a} {item[1]}.",
            f"{p.name} owns {a} {item[1]}.",
            f"There are {a} {item[1]} in {p.name}'s bag.",
        ]
    )


def question_now(rng: random.Random, p: Person, item) -> str:
    """The question for the current value: how many ``item`` ``p`` has now."""
    return rng.choice(
        [
            f"How many {item[1]} does {p.name} have now?",
            f"How many {item[1]} does {p.name} have in the end?",
            f"How many {item[1]} does {p.name} have at the end?",
        ]
    )


def chain_story(rng: random.Random, n_ops: int) -> tuple[Problem, Person, tuple[str, str]]:
    """A story of ``n_ops`` operations: opening fact, then events, each step reusing the previous value."""
    p, q = draw_people(rng, 2)
    (item,) = draw_items(rng, 1)
    pb = Problem()
    pb.facts.append(opening_fact(rng, pb, p, item, allow_mul=n_ops >= 2))
    while len(pb.steps) < n_ops:
        ops = feasible_ops(pb.value)
        op = rng.choices(ops, weights=[OP_WEIGHTS[o] for o in ops])[0]
        sentence = apply_event(rng, pb, p, q, item, op)
        pb.facts.append(with_connective(rng, sentence) if len(pb.facts) > 1 else sentence)
    pb.question = question_now(rng, p, item)
    return pb, p, item


def distractor(rng: random.Random, p: Person, avoid: Iterable[str], item, third_person: bool = True) -> str:
    """A sentence with a number that the question does not need (another item, an age, a third person)."""
    other_item = rng.choice([x for x in ITEMS if x != item])[1]
    d = draw_operand(rng)
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


def draw_options(rng: random.Random, value: int) -> tuple[list[int], int]:
    """Five distinct sorted options within 8 of ``value``; returns (options, index of ``value``)."""
    below = list(range(max(0, value - 8), value))
    above = list(range(value + 1, min(MAX_VALUE, value + 8) + 1))
    positions = [i for i in range(5) if i <= len(below) and 4 - i <= len(above)]
    pos = rng.choice(positions)
    opts = sorted(rng.sample(below, pos)) + [value] + sorted(rng.sample(above, 4 - pos))
    return opts, pos
