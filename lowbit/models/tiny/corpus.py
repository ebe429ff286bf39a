"""The embedded tiny model's pre-training corpus: general synthetic text, and worked problems in plain prose.

Built from the sentence templates of the synthetic word problems (:mod:`lowbit.data.wordproblems`):
:func:`pretrain_corpus` gives arithmetic facts, chained computations, option lists
("In the list (A) 21 (B) 24 ..., 24 is option (B).") and short stories whose results are stated as prose
("Now she has 17 pens."); :func:`worked_corpus` gives problems of the four families followed by their equations
and result, never one of the synthetic test problems. Neither uses the instruction/response layout nor
"The answer is", and the general text never pairs a story with its equations: mapping a story to equations and
to the answer format is left to fine-tuning.

The text must stay byte-identical for a given seed: the embedded checkpoint, its held-out and calibration text
(:func:`lowbit.models.tiny.heldout_text_ids`) and the demo's numbers are built from it.
"""

from __future__ import annotations

import random

from lowbit.data.synthetic import FAMILIES, generate_split, problem_key, test_split
from lowbit.data.wordproblems import (
    FACTORS,
    LETTERS,
    MAX_OPERAND,
    MAX_VALUE,
    MIN_RESULT,
    OP_WEIGHTS,
    OPS,
    Problem,
    apply_event,
    count_of,
    distractor,
    draw_items,
    draw_operand,
    draw_options,
    draw_people,
    feasible_ops,
    opening_fact,
    seeded_rng,
    with_connective,
)

__all__ = ["pretrain_corpus", "worked_corpus", "worked_problem_text"]


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
        c = OPS[op](a, b)
        if c is not None and 0 <= c <= MAX_VALUE:
            return a, op, b, c


def _story_prose(rng: random.Random) -> str:
    """A story from the problem templates with every result stated in prose (no equations, no question)."""
    p, q = draw_people(rng, 2)
    (item,) = draw_items(rng, 1)
    pb = Problem()
    sentences = [opening_fact(rng, pb, p, item)]
    if pb.steps:
        sentences.append(f"So {p.pron} has {count_of(pb.value, item)}.")
    for _ in range(rng.randint(1, 3)):
        ops = feasible_ops(pb.value)
        op = rng.choices(ops, weights=[OP_WEIGHTS[o] for o in ops])[0]
        sentences.append(with_connective(rng, apply_event(rng, pb, p, q, item, op)))
        sentences.append(rng.choice([f"Now {p.pron} has {count_of(pb.value, item)}.",
                                     f"{p.name} now has {count_of(pb.value, item)}."]))  # fmt: skip
    if rng.random() < 0.3:
        pos = rng.randint(1, len(sentences))
        sentences.insert(pos, distractor(rng, p, (p.name, q.name), item, third_person=False))
    return " ".join(sentences)


def _story_relations(rng: random.Random) -> str:
    """Totals, differences, sharing and comparisons told as prose with their results."""
    p, q = draw_people(rng, 2)
    (item,) = draw_items(rng, 1)
    it = item[1]
    a, b = draw_operand(rng), draw_operand(rng)
    kind = rng.choice(["total", "more", "fewer", "share", "before"])
    if kind == "total":
        return f"{p.name} has {a} {it} and {q.name} has {b} {it}. Together they have {count_of(a + b, item)}."
    if kind == "more":
        return f"{p.name} has {a} {it}. {q.name} has {b} more {it} than {p.name}, so {q.name} has {a + b} {it}."
    if kind == "fewer":
        a, b = max(a, b) + 1, min(a, b)
        return (f"{p.name} has {a} {it}. {q.name} has {b} fewer {it} than {p.name}, "
                f"so {q.name} has {count_of(a - b, item)}.")  # fmt: skip
    if kind == "share":
        k = rng.choice(FACTORS)
        return f"{p.name} shares {k * a} {it} equally among {k} friends. Each friend gets {count_of(a, item)}."
    return f"{p.name} had {a} {it} and got {b} more. Now {p.pron} has {a + b} {it}, {b} more than before."


def _option_list(rng: random.Random) -> str:
    """Five options and the letter of a value among them, in one of three phrasings."""
    value = rng.randint(0, MAX_VALUE)
    opts, pos = draw_options(rng, value)
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
    rng = seeded_rng("pretrain", seed)
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
            pb = Problem()
            pb.value = draw_operand(rng)
            for _ in range(rng.randint(2, 4)):
                ops = feasible_ops(pb.value)
                op = rng.choices(ops, weights=[OP_WEIGHTS[o] for o in ops])[0]
                cur = pb.value
                if op == "+":
                    pb.step(cur, op, draw_operand(rng, min(MAX_OPERAND, MAX_VALUE - cur)))
                elif op == "-":
                    pb.step(cur, op, draw_operand(rng, min(MAX_OPERAND, cur - MIN_RESULT)))
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
    seeded_rng("worked-shuffle", seed).shuffle(docs)
    return docs[:n]
