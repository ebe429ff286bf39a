"""Answer extraction on realistic outputs (docs/METHODS.md, Evaluation)."""

import pytest

from lowbit.eval.answers import extract_answer, is_correct


@pytest.mark.parametrize("text,expected", [
    ("So the total is 1,234.5. The answer is 1,234.5", 1234.5),
    ("-3", -3.0),
    ("He pays $18.00 in total. The answer is $18.00.", 18.0),
    ("5/2", 2.0),  # LLM-Adapters protocol: the last number
    ("The answer is 42. I hope this helps, 3 friends!", 3.0),  # last number, as published
    ("There is no number here.", None),
    ("12 + 5 = 17. 17 * 2 = 34. The answer is 34.", 34.0),
])
def test_numeric(text, expected):
    assert extract_answer(text, "numeric") == expected


@pytest.mark.parametrize("text,adapters,strict", [
    ("24 is option (C). The answer is C.", "C", "C"),
    ("The answer is (C)", "C", "C"),
    ("C) 12", "C", "C"),
    ("the answer is (d)", None, "D"),
    ("I think it is twelve.", None, None),
    ("After checking, the answer is E", "A", "E"),  # 'A' of 'After' fools the published rule
])
def test_choice(text, adapters, strict):
    assert extract_answer(text, "choice", "llm-adapters") == adapters
    assert extract_answer(text, "choice", "strict") == strict


def test_is_correct():
    assert is_correct(18.0, "18", "numeric")
    assert is_correct(1234.5004, "1,234.5", "numeric")
    assert not is_correct(18.01, "18", "numeric")
    assert not is_correct(None, "18", "numeric")
    assert is_correct("c", "C", "choice")
    assert not is_correct("B", "C", "choice")


def test_bad_kind():
    with pytest.raises(ValueError, match="unknown kind"):
        extract_answer("1", "number")
    with pytest.raises(ValueError, match="unknown variant"):
        extract_answer("A", "choice", "loose")


@pytest.mark.parametrize("text,expected", [
    ("The answer is 1,234.5", 1234.5),
    ("The answer is 1,234.5.", 1234.5),  # the sentence's full stop is not part of the number
    ("The temperature drops by 3 degrees to -3. The answer is -3.", -3.0),
    ("Each ticket costs $ 9.00. So 4 tickets cost $36.00", 36.0),
    ("She gets 5/2 = 2.5 pies, i.e. 5/2", 2.0),  # a trailing fraction reads as its denominator (published rule)
    ("The answer is 12.\n\nHe also has 3 dogs.", 3.0),  # trailing text with a number wins, as published
    ("", None),
])
def test_numeric_more(text, expected):
    assert extract_answer(text, "numeric") == expected


@pytest.mark.parametrize("text,adapters,strict", [
    ("(B) 15 is the right one", "B", "B"),
    ("the answer is: (e) 960", None, "E"),
    ("So the answer is (B), not (C).", "B", "B"),
    ("Rationale: 900 + 60 = 960.The answer is (E).", "E", "E"),
    ("the answer is b", None, "B"),
])
def test_choice_more(text, adapters, strict):
    assert extract_answer(text, "choice", "llm-adapters") == adapters
    assert extract_answer(text, "choice", "strict") == strict


def test_score_generation():
    from lowbit.eval.answers import score_generation

    assert score_generation("The answer is 1,234.", "1234.0", "numeric") == (1234.0, True)
    assert score_generation("The answer is (C).", "C", "choice", "strict") == ("C", True)
    assert score_generation("no idea", "C", "choice") == (None, False)
