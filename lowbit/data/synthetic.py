"""Synthetic arithmetic word problems in the Math10K record format, sized for a tiny LLaMA.

Why this exists
---------------
The real Math10K protocol (fine-tune on Math10K, test on GSM8K, SVAMP, MAWPS and AQuA) needs a 7B model. For
a tiny LLaMA (3–6M parameters, ~20 minutes of CPU training) we generate look-alike data that such a model can
actually learn, so that quantization and adapter methods can be compared on a task where the full-precision
model is well above chance.

Design, following what was measured at this model size
------------------------------------------------------
* **Small numbers.** Every number stated in a problem (apart from the multiple-choice options) is an
  integer 2–20; multiplication and division are only by 2–5 (one factor of every product is 2–5, every
  divisor is 2–5 and every division is exact); every intermediate and final result is an integer in
  2–199 (the ranges and sentence templates are in :mod:`lowbit.data.wordproblems`). Full-range multi-digit
  arithmetic was measured to be out of reach at this size; this range was learnable (84.5% one-step, 56.5%
  multi-step after 12 minutes).
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
    the four distractors are within 8 of it. An earlier multiple-choice run at this size stayed at chance
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
* **Pre-training text** for the tiny base model is built from the same sentence templates, in
  :mod:`lowbit.models.tiny.corpus`.

Records are ``{"instruction", "input": "", "output", "answer"}`` with ``answer`` a plain integer string
("28") for the numeric families and a letter "A".."E" for aqua. :func:`check_record` re-verifies every
equation and the final answer.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from pathlib import Path

from lowbit.io import atomic_write_text

from .records import FIELDS
from .wordproblems import (
    FACTORS,
    LETTERS,
    MAX_OPERAND,
    MIN_OPERAND,
    MIN_RESULT,
    OPS,
    Problem,
    apply_event,
    chain_story,
    distractor,
    draw_items,
    draw_operand,
    draw_options,
    draw_people,
    feasible_ops,
    groups_fact,
    opening_fact,
    question_now,
    seeded_rng,
)

__all__ = [
    "FAMILIES",
    "TRAIN_MIX",
    "check_record",
    "generate_problem",
    "generate_split",
    "make_dataset",
    "problem_key",
    "rationale_answer",
    "test_split",
    "train_split",
    "validation_split",
]

FAMILIES = ("gsm8k", "svamp", "mawps", "aqua")
#: Share of each family in ``train.json``. The multi-step and multiple-choice families are the hard ones (as
#: measured on the tiny model), so they get more examples than the one-step family.
TRAIN_MIX = {"gsm8k": 0.30, "svamp": 0.25, "mawps": 0.15, "aqua": 0.30}
ANSWER_CHOICES = " Answer Choices: "
_EQ = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
_FINAL = re.compile(r"The answer is (\S+?)\.\s*$")
_OPTION = re.compile(r"\(([A-E])\) (\d+)")


# ----------------------------------------------------------------------------------------------- families
def _one_step(rng: random.Random) -> Problem:
    """A MAWPS-like one-operation problem."""
    p, q = draw_people(rng, 2)
    (item,) = draw_items(rng, 1)
    it = item[1]
    pb = Problem()
    kind = rng.choice(["event", "event", "groups", "share", "total", "more"])
    if kind == "event":
        pb.facts.append(opening_fact(rng, pb, p, item, allow_mul=False))
        ops = [o for o in ("+", "-", "*") if o in feasible_ops(pb.value)]
        op = rng.choices(ops, weights=[{"+": 4, "-": 4, "*": 1}[o] for o in ops])[0]
        pb.facts.append(apply_event(rng, pb, p, q, item, op))
        pb.question = question_now(rng, p, item)
    elif kind == "groups":
        pb.facts.append(groups_fact(rng, pb, p, item))
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
        a, b = draw_operand(rng), draw_operand(rng)
        pb.step(a, "+", b)
        pb.facts.append(f"{p.name} has {a} {it} and {q.name} has {b} {it}.")
        pb.question = rng.choice(
            [
                f"How many {it} do they have in total?",
                f"How many {it} do {p.name} and {q.name} have together?",
            ]
        )
    else:  # more
        b = draw_operand(rng, MAX_OPERAND - MIN_RESULT)
        a = rng.randint(b + MIN_RESULT, MAX_OPERAND)
        pb.step(a, "-", b)
        pb.facts += [f"{p.name} has {a} {it}.", f"{q.name} has {b} {it}."]
        pb.question = f"How many more {it} does {p.name} have than {q.name}?"
    return pb


def _svamp(rng: random.Random) -> Problem:
    """SVAMP-like: 1–2 operations, a distractor and/or reordered or inverse phrasing."""
    p, q = draw_people(rng, 2)
    (item,) = draw_items(rng, 1)
    it = item[1]
    kind = rng.choice(["inverse_add", "inverse_sub", "compare", "compare_total", "chain1", "chain2", "total"])
    pb = Problem()
    reorder_ok = True
    if kind == "inverse_add":  # bought b, now has c -> had c - b
        b = draw_operand(rng, MAX_OPERAND - MIN_RESULT)
        c = rng.randint(b + MIN_RESULT, MAX_OPERAND)
        pb.step(c, "-", b)
        verb = rng.choice(["buys", "finds", "gets"])
        pb.facts += [f"{p.name} {verb} {b} more {it}.", f"Now {p.pron} has {c} {it}."]
        pb.question = f"How many {it} did {p.name} have at first?"
        reorder_ok = False
    elif kind == "inverse_sub":  # gave away b, now has c -> had c + b
        b, c = draw_operand(rng), draw_operand(rng)
        pb.step(c, "+", b)
        pb.facts += [
            rng.choice([f"{p.name} gives {b} {it} to {q.name}.", f"{p.name} sells {b} {it}."]),
            f"Now {p.pron} has {c} {it}.",
        ]
        pb.question = f"How many {it} did {p.name} have at first?"
        reorder_ok = False
    elif kind in ("compare", "compare_total"):
        a = draw_operand(rng)
        if rng.random() < 0.5:
            b = draw_operand(rng)
            pb.step(a, "+", b)
            rel = f"{q.name} has {b} more {it} than {p.name}."
        else:
            a = rng.randint(MIN_OPERAND + MIN_RESULT, MAX_OPERAND)
            b = draw_operand(rng, a - MIN_RESULT)
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
        a, b = draw_operand(rng), draw_operand(rng)
        pb.step(a, "+", b)
        pb.facts += [f"{q.name} has {a} {it}.", f"{p.name} has {b} {it}."]
        pb.question = f"How many {it} do {p.name} and {q.name} have together?"
    else:
        pb, p, item = chain_story(rng, 1 if kind == "chain1" else 2)
    # Names instead of pronouns: a distractor about a third person or a question asked first would make a
    # pronoun ambiguous or make it precede the name.
    pb.facts = [re.sub(r"\b(?:[Ss]he|[Hh]e)\b", p.name, f) for f in pb.facts]
    question_first = reorder_ok and rng.random() < 0.5
    if not question_first or rng.random() < 0.7:
        # the story opens with the person it is about unless the question comes first
        pos = rng.randint(0 if question_first else 1, len(pb.facts))
        sentence = distractor(rng, p, (p.name, q.name), item)
        if pos <= 1:  # nothing about the person has been said yet
            sentence = sentence.replace(" also has ", " has ")
        pb.facts.insert(pos, sentence)
    if question_first:
        pb.facts.insert(0, pb.question)
        pb.question = ""
    return pb


def _text(pb: Problem) -> str:
    return " ".join(pb.facts + ([pb.question] if pb.question else []))


def generate_problem(family: str, rng: random.Random) -> dict:
    """One record ``{"instruction", "input": "", "output", "answer"}`` of ``family`` drawn from ``rng``."""
    if family == "mawps":
        pb = _one_step(rng)
    elif family == "gsm8k":
        pb, _, _ = chain_story(rng, rng.choice([2, 3]))
    elif family == "svamp":
        pb = _svamp(rng)
    elif family == "aqua":
        pb = _one_step(rng) if rng.random() < 0.5 else chain_story(rng, 2)[0]
        opts, pos = draw_options(rng, pb.value)
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
    if set(rec) != set(FIELDS):
        raise ValueError(f"keys {sorted(rec)}")
    if not all(isinstance(v, str) for v in rec.values()):
        raise ValueError("non-string field")
    out = rec["output"]
    eqs = _EQ.findall(out)
    if not eqs:
        raise ValueError(f"no equation in {out!r}")
    for a, op, b, c in eqs:
        if OPS[op](int(a), int(b)) != int(c):
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


def generate_split(family: str, n: int, seed: int, exclude: Iterable[str] = frozenset()) -> list[dict]:
    """``n`` problems of ``family`` with distinct stems (see :func:`problem_key`), none excluded.

    A problem is skipped when its stem equals the stem of an instruction in ``exclude`` (so an aqua problem is
    never reused with different options); the same ``(family, n, seed, exclude)`` gives the same list."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    rng = seeded_rng("split", family, seed)
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


test_split.__test__ = False  # not a test, though pytest would collect it by name where it is imported


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
    seeded_rng("shuffle", seed).shuffle(train)
    return train


def validation_split(family: str, n: int, seed: int = 0, n_train: int = 10000, n_test: int = 500) -> list[dict]:
    """``n`` problems of ``family`` from the training distribution for model selection (e.g. a learning-rate
    search): no stem of the first ``n_test`` test problems of any family, nor of :func:`train_split` ``(n_train,
    seed)`` (whose per-family lists extend those of any shorter training set of the same seed), occurs in it, so
    tuning on it never reads a test problem nor scores a training one. A longer split extends a shorter one."""
    exclude = {problem_key(r["instruction"]) for f in FAMILIES for r in test_split(f, n_test, seed)}
    exclude |= {problem_key(r["instruction"]) for r in train_split(n_train, seed, n_test)}
    return generate_split(family, n, seed * 1000 + 3, exclude=exclude)


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
