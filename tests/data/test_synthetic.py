"""Synthetic Math10K-format data (lowbit.data.synthetic): determinism, disjointness and rationale correctness.

The equations are re-evaluated here with plain Python arithmetic, independently of ``check_record``. The
pre-training corpus built from the same templates is tested in tests/models/test_corpus.py.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest
from text_checks import ARITH, NUM, equations, sha

from lowbit.data import (
    FAMILIES,
    check_record,
    generate_problem,
    generate_split,
    make_dataset,
    problem_key,
    rationale_answer,
    synthetic,
)

NUMERIC_OUT = re.compile(r"^(?:\d+ [-+*/] \d+ = \d+\. )+The answer is (\d+)\.$")
AQUA_OUT = re.compile(r"^(?:\d+ [-+*/] \d+ = \d+\. )+(\d+) is option \(([A-E])\)\. The answer is ([A-E])\.$")
STEPS = {"mawps": {1}, "gsm8k": {2, 3}, "svamp": {1, 2}, "aqua": {1, 2}}


def options(instruction: str) -> list[tuple[str, int]]:
    return [(L, int(v)) for L, v in re.findall(r"\(([A-E])\) (\d+)", instruction)]


@pytest.fixture(scope="module")
def default_sets(tmp_path_factory):
    """The default-size dataset (10k train, 4 x 500 test), written twice with the same seed."""
    root = tmp_path_factory.mktemp("synthetic")
    paths = make_dataset(root / "a", seed=0)
    again = make_dataset(root / "b", seed=0)
    data = {k: json.loads(p.read_text()) for k, p in paths.items()}
    return root, paths, again, data


def all_records(data):
    for split, recs in data.items():
        for rec in recs:
            yield split, rec


def test_paths_and_sizes(default_sets):
    root, paths, _, data = default_sets
    assert set(paths) == {"train", *FAMILIES}
    assert paths["train"] == root / "a" / "train.json"
    for f in FAMILIES:
        assert paths[f] == root / "a" / "test" / f"{f}.json"
        assert len(data[f]) == 500
    assert len(data["train"]) == 10000
    # nothing but the five files (atomic writes leave no temporaries)
    files = sorted(p.relative_to(root / "a").as_posix() for p in (root / "a").rglob("*") if p.is_file())
    assert files == sorted(["train.json"] + [f"test/{f}.json" for f in FAMILIES])


def test_same_seed_byte_identical(default_sets):
    _, paths, again, _ = default_sets
    for k in paths:
        assert paths[k].read_bytes() == again[k].read_bytes(), k
    text = paths["train"].read_text()
    assert text == json.dumps(json.loads(text), indent=2, ensure_ascii=False) + "\n"


def test_different_seed_differs(tmp_path):
    a = make_dataset(tmp_path / "s0", seed=0, n_train=400, n_test=40)
    b = make_dataset(tmp_path / "s1", seed=1, n_train=400, n_test=40)
    for k in a:
        assert a[k].read_bytes() != b[k].read_bytes(), k
    assert generate_split("gsm8k", 20, seed=0) != generate_split("gsm8k", 20, seed=1)
    assert generate_split("gsm8k", 20, seed=3) == generate_split("gsm8k", 20, seed=3)


def test_train_test_disjoint(default_sets):
    _, _, _, data = default_sets
    train_keys = [problem_key(r["instruction"]) for r in data["train"]]
    assert len(set(train_keys)) == len(train_keys)
    train_instr = {r["instruction"] for r in data["train"]}
    for f in FAMILIES:
        instr = [r["instruction"] for r in data[f]]
        assert len(set(instr)) == len(instr), f
        assert not train_instr & set(instr), f
        assert not set(train_keys) & {problem_key(i) for i in instr}, f


def test_train_mixes_all_families(default_sets):
    _, _, _, data = default_sets
    n_aqua = sum("Answer Choices:" in r["instruction"] for r in data["train"])
    assert 0.2 * 10000 < n_aqua < 0.4 * 10000
    n_steps = Counter(len(equations(r["output"])) for r in data["train"])
    assert set(n_steps) == {1, 2, 3}
    # shuffled: aqua records are not all in one block
    first = ["Answer Choices:" in r["instruction"] for r in data["train"][:200]]
    assert 20 < sum(first) < 120


def test_record_schema(default_sets):
    _, _, _, data = default_sets
    for _, rec in all_records(data):
        assert list(rec) == ["instruction", "input", "output", "answer"]
        assert all(isinstance(v, str) for v in rec.values())
        assert rec["input"] == ""
        assert rec["instruction"] and rec["output"] and rec["answer"]
        assert rec["output"].endswith(f"The answer is {rec['answer']}.")
        assert rationale_answer(rec["output"]) == rec["answer"]


def test_every_record_consistent(default_sets):
    """check_record passes, and every equation holds when recomputed here (exact rationals)."""
    _, _, _, data = default_sets
    n_eq = 0
    for split, rec in all_records(data):
        check_record(rec)
        eqs = equations(rec["output"])
        assert eqs, rec
        for a, op, b, c in eqs:
            assert op in "+-*/", rec
            assert ARITH[op](a, b) == c, (split, rec["output"])
            if op == "*":
                assert a in (2, 3, 4, 5) or b in (2, 3, 4, 5), rec["output"]
            if op == "/":
                assert b in (2, 3, 4, 5), rec["output"]
            n_eq += 1
        # each step reuses the previous result
        for (_, _, _, c), (a, _, b, _) in zip(eqs, eqs[1:]):
            assert c in (a, b), rec["output"]
        last = eqs[-1][3]
        if "Answer Choices:" in rec["instruction"]:
            m = AQUA_OUT.match(rec["output"])
            assert m, rec["output"]
            assert int(m.group(1)) == last and m.group(2) == m.group(3) == rec["answer"]
        else:
            m = NUMERIC_OUT.match(rec["output"])
            assert m, rec["output"]
            assert rec["answer"] == str(last)
    assert n_eq > 10000


@pytest.mark.parametrize("family", FAMILIES)
def test_step_counts_and_operands(default_sets, family):
    _, _, _, data = default_sets
    counts = Counter(len(equations(r["output"])) for r in data[family])
    assert set(counts) == STEPS[family], counts
    for rec in data[family]:
        stem = problem_key(rec["instruction"])
        stated = [int(x) for x in NUM.findall(stem)]
        assert all(2 <= x <= 20 for x in stated), stem
        if family in ("mawps", "gsm8k"):
            # no distractors: every stated number is an operand of the rationale
            operands = Counter(x for a, _, b, _ in equations(rec["output"]) for x in (a, b))
            assert not Counter(stated) - operands, rec


def test_svamp_has_distractor_or_reordering(default_sets):
    _, _, _, data = default_sets
    varied = 0
    for rec in data["svamp"]:
        stated = Counter(int(x) for x in NUM.findall(rec["instruction"]))
        operands = Counter(x for a, _, b, _ in equations(rec["output"]) for x in (a, b))
        if stated - operands or rec["instruction"].startswith("How many"):
            varied += 1
    assert varied >= 0.9 * len(data["svamp"])


def test_numbers_small_and_non_negative(default_sets):
    _, _, _, data = default_sets
    for _, rec in all_records(data):
        for key in ("instruction", "output", "answer"):
            text = rec[key]
            assert not re.search(r"-\s?\d", text.replace(" - ", " ")), text
            for x in NUM.findall(text):
                assert "." not in x and 0 <= int(x) < 200, text


def test_aqua_options(default_sets):
    _, _, _, data = default_sets
    aqua = list(data["aqua"]) + [r for r in data["train"] if "Answer Choices:" in r["instruction"]]
    letters = Counter()
    for rec in aqua:
        opts = options(rec["instruction"])
        assert [L for L, _ in opts] == list("ABCDE"), rec["instruction"]
        values = [v for _, v in opts]
        assert len(set(values)) == 5, values
        last = equations(rec["output"])[-1][3]
        correct = [L for L, v in opts if v == last]
        assert correct == [rec["answer"]], (rec, correct)
        assert all(abs(v - last) <= 8 for v in values)
        # LLM-Adapters takes the first capital A-E in the response: it must be the answer. Before the final
        # sentence, the only capital A-E is the answer letter in "v is option (X)".
        out = rec["output"]
        head = out[: out.rindex("The answer is")]
        assert re.findall(r"[A-E]", head.replace(f"is option ({rec['answer']})", "")) == [], out
        assert re.search(r"[A-E]", out).group() == rec["answer"]
        letters[rec["answer"]] += 1
    assert set(letters) == set("ABCDE")
    assert min(letters.values()) > 0.12 * len(aqua)


def test_generate_split_exclude_and_errors():
    first = generate_split("aqua", 50, seed=5)
    second = generate_split("aqua", 50, seed=5, exclude={r["instruction"] for r in first})
    assert not {problem_key(r["instruction"]) for r in first} & {problem_key(r["instruction"]) for r in second}
    with pytest.raises(ValueError):
        generate_problem("math", random.Random(0))
    with pytest.raises(ValueError):
        generate_split("math", 1, seed=0)


def test_rationale_answer():
    assert rationale_answer("3 + 4 = 7. The answer is 7.") == "7"
    assert rationale_answer("6 * 4 = 24. 24 is option (C). The answer is C.") == "C"
    assert rationale_answer("The answer is (D).") == "D"
    assert rationale_answer("3 + 4 = 7.") is None
    assert rationale_answer("The answer is 7. Then more text.") is None


def test_check_record_rejects_inconsistent():
    rng = random.Random(0)
    good = generate_problem("gsm8k", rng)
    check_record(good)
    bad_eq = dict(good, output=good["output"].replace(" = ", " = 1", 1))
    bad_answer = dict(good, answer=str(int(good["answer"]) + 1))
    no_final = dict(good, output=good["output"].rsplit(" The answer", 1)[0])
    extra_key = dict(good, id="1")
    aqua = generate_problem("aqua", rng)
    check_record(aqua)
    other = next(L for L in "ABCDE" if L != aqua["answer"])
    wrong_letter = dict(aqua, answer=other, output=aqua["output"].replace(f"is {aqua['answer']}.", f"is {other}."))
    for rec in (bad_eq, bad_answer, no_final, extra_key, wrong_letter):
        with pytest.raises(ValueError):
            check_record(rec)


# The generated problems are pinned: the embedded tiny model was fine-tuned and is evaluated on these exact texts
# (sha256 of ``json.dumps`` of the records; recorded before the generator was split across modules).
PINNED = {
    ("generate_split", "gsm8k"): "9b2c254a0826ca5850e6c965771398825adc070cdee547d2651f553641a06780",
    ("generate_split", "svamp"): "51fb6574f51206959d88a90be60d2e2f306404640886d06facb6929b10dd31d6",
    ("generate_split", "mawps"): "32896ea80fdab58f835fc5bfc0faf34530038ff9e2487a26aaf7f12b1f1b1c30",
    ("generate_split", "aqua"): "ac2936f3f29a34fe4e428f870f0151924bbe7e04bb5780024755c8bea825b631",
    ("test_split", "gsm8k"): "7bffc843665ef644ff509910c9abd68285de6e14241542e5a4570ad59e29abf9",
    ("test_split", "svamp"): "4ec92e8014095d0fca447a061bb911c3b1f1b071ab0ba55ef039e093c9f93429",
    ("test_split", "mawps"): "369847a61e95b851fdad5164ade55f1aeb188fe2627c630be24388f4d3e64d00",
    ("test_split", "aqua"): "ef82d50fc44ababa14f3a385e6e3d28472ceb5ccd5ea43c45449f4644a291ab9",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_generated_problems_are_pinned(family):
    assert sha(generate_split(family, 200, 3)) == PINNED["generate_split", family]
    assert sha(synthetic.test_split(family, 100, 0)) == PINNED["test_split", family]


def test_train_split_is_pinned():
    assert sha(synthetic.train_split(2000, 0)) == "485463370a63fa66c56e2aaf90e75f98dee1d8b416c7d3d94f4397dd3dbc95fb"
