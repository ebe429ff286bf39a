"""The tiny model's pre-training corpus (lowbit.models.tiny.corpus): determinism, true equations, no answer format.

The equations are re-evaluated here with plain Python arithmetic. The texts are pinned by hash: the embedded
checkpoint, its held-out and calibration text and the demo's numbers are built from them.
"""

from __future__ import annotations

from text_checks import ARITH, NUM, equations, sha

from lowbit.data.synthetic import FAMILIES, generate_split, problem_key
from lowbit.data.synthetic import test_split as synthetic_test_split
from lowbit.models.tiny.corpus import pretrain_corpus, worked_corpus, worked_problem_text


def test_pretrain_corpus():
    docs = pretrain_corpus(3000, seed=0)
    assert len(docs) == 3000
    assert docs == pretrain_corpus(3000, seed=0)
    assert docs != pretrain_corpus(3000, seed=1)
    text = "\n".join(docs)
    for banned in ("### Instruction", "### Response", "Instruction:", "Response:", "The answer is"):
        assert banned not in text
    assert all(isinstance(d, str) and d.strip() for d in docs)
    eqs = equations(text)
    assert len(eqs) > 3000
    for a, op, b, c in eqs:
        assert ARITH[op](a, b) == c, (a, op, b, c)
    for x in NUM.findall(text):
        assert 0 <= int(x) < 200
    # prose stories with results, not only equations
    assert sum(" has " in d and "=" not in d for d in docs) > 600
    assert sum("option (" in d for d in docs) > 100


def test_worked_corpus_excludes_test_problems_and_the_answer_format():
    docs = worked_corpus(400, seed=0)
    assert len(docs) == 400 and docs == worked_corpus(400, seed=0)
    text = "\n".join(docs)
    for banned in ("### Instruction", "### Response", "The answer is"):
        assert banned not in text
    for a, op, b, c in equations(text):
        assert ARITH[op](a, b) == c, (a, op, b, c)
    test_stems = {problem_key(r["instruction"]) for f in FAMILIES for r in synthetic_test_split(f, 500, 0)}
    for d in docs:  # a worked text is the problem, then its equations (aqua: then its options)
        for stem in test_stems:
            rest = d[len(stem) + 1:] if d.startswith(stem + " ") else ""
            assert not (rest[:1].isdigit() or rest.startswith("Answer Choices")), d


def test_worked_problem_text():
    gsm, aqua = generate_split("gsm8k", 1, 0)[0], generate_split("aqua", 1, 0)[0]
    text = worked_problem_text(gsm)
    assert text.startswith(gsm["instruction"]) and text.endswith(f"So the result is {gsm['answer']}.")
    assert worked_problem_text(aqua).endswith(f"is option ({aqua['answer']}).")


def test_corpus_text_is_pinned():
    """sha256 of ``json.dumps`` of the documents, recorded before the corpus moved to lowbit.models.tiny.corpus."""
    assert sha(pretrain_corpus(3000, seed=12345)) == "be163c65055d73e258b95d47cdb69564a773693ec12d42c45b152f30d395ee1d"
    assert sha(pretrain_corpus(2000, seed=0)) == "7064ea212a8a7d46eaca7f0e446becea90406b5d7cf9776a657dfea2447ccf35"
    assert sha(worked_corpus(500, 0)) == "1ee7aa34e26cbc3bd19dc4199cfc66b4d9a7ae16dd4eb7a172a1cdc3a15e8288"
