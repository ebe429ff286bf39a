"""Loaders of the Math10K training data (lowbit.data.loaders, .mawps, .records), checked against the real files.

The raw files are re-read here with plain ``json`` and the converted records compared with them; MAWPS rationales
are re-evaluated with Python arithmetic, independently of the loader's AST evaluator. Tests of the real files take
the ``real_data_dir`` fixture and skip without the data; the others use ``tmp_path`` files and always run.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import datasets
import pytest

from lowbit.data.loaders import (
    check_no_test_overlap,
    default_math_training_set,
    find_test_overlap,
    load_gsm8k_jsonl,
    load_source,
    mix_sources,
    normalize_question,
)
from lowbit.data.mawps import load_mawps_train, mawps_to_record
from lowbit.data.records import FIELDS, format_number, load_llm_adapters_json
from lowbit.data.testsets import ALL_TEST_SETS, PAPER_TEST_SETS, load_test_sets

# The 20 MAWPS train records whose equation is broken or contradicts `ans` (measured; see the module docstring).
MAWPS_BAD_IDS = {603, 370, 1556, 342, 1592, 756, 1115, 125, 1767, 67, 615, 2234, 1689, 2250, 1138, 2185, 2286,
                 1679, 513, 231}
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@pytest.fixture(scope="module")
def gsm_train_path(real_data_dir) -> Path:
    return real_data_dir / "gsm8k_openai" / "train.jsonl"


@pytest.fixture(scope="module")
def mawps_train_path(real_data_dir) -> Path:
    return real_data_dir / "mawps" / "trainset.json"


@pytest.fixture(scope="module")
def gsm_raw(gsm_train_path) -> list[dict]:
    return [json.loads(line) for line in gsm_train_path.read_text().splitlines()]


@pytest.fixture(scope="module")
def gsm(gsm_train_path) -> list[dict]:
    return load_gsm8k_jsonl(gsm_train_path)


@pytest.fixture(scope="module")
def mawps(mawps_train_path) -> list[dict]:
    return load_mawps_train(mawps_train_path)


@pytest.fixture(scope="module")
def tests4(real_data_dir) -> dict[str, list[dict]]:
    return load_test_sets(real_data_dir, PAPER_TEST_SETS)


# ----------------------------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("x, want", [(8.0, "8"), (8, "8"), (-6.0, "-6"), (-0.0, "0"), (0.8333333333333334, "0.8333"),
                                     ("1,080", "1080"), ("576.0", "576"), (1236666.67, "1236666.67"), (0.53, "0.53"),
                                     (13.978, "13.978"), (2.00004, "2")])
def test_format_number(x, want):
    assert format_number(x) == want


# ---------------------------------------------------------------------------------------- LLM-Adapters JSON
def test_llm_adapters_test_sets_load_with_documented_sizes(real_data_dir):
    sizes = {"gsm8k": 1319, "SVAMP": 1000, "mawps": 238, "AQuA": 254, "AddSub": 395, "MultiArith": 600,
             "SingleEq": 508}
    sets = load_test_sets(real_data_dir, ALL_TEST_SETS)
    assert {k: len(v) for k, v in sets.items()} == sizes
    for recs in sets.values():
        assert all(list(r) == list(FIELDS) and all(isinstance(r[f], str) for f in FIELDS) for r in recs)
    assert {r["answer"] for r in sets["AQuA"]} <= set("ABCDE")


def _write(tmp_path: Path, name: str, obj) -> Path:
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def _good(i: int) -> dict:
    return {"instruction": f"What is {i} + 1?", "input": "", "output": f"{i} + 1 = {i + 1}. The answer is {i + 1}.",
            "answer": str(i + 1)}


def test_llm_adapters_missing_field_names_file_index_field(tmp_path):
    recs = [_good(i) for i in range(20)]
    del recs[17]["output"]
    p = _write(tmp_path, "math_10k.json", recs)
    with pytest.raises(ValueError, match=r"math_10k\.json: record 17 lacks field 'output'"):
        load_llm_adapters_json(p)


def test_llm_adapters_wrong_type_and_shape(tmp_path):
    recs = [_good(i) for i in range(3)]
    recs[2]["answer"] = 3  # a number, not a string
    with pytest.raises(ValueError, match=r"bad\.json: record 2 field 'answer' is a int"):
        load_llm_adapters_json(_write(tmp_path, "bad.json", recs))
    with pytest.raises(ValueError, match=r"obj\.json: expected a JSON array of records, found a JSON dict"):
        load_llm_adapters_json(_write(tmp_path, "obj.json", {"data": recs}))
    with pytest.raises(ValueError, match=r"empty\.json: the JSON array is empty"):
        load_llm_adapters_json(_write(tmp_path, "empty.json", []))
    with pytest.raises(ValueError, match=r"trunc\.json: not valid JSON"):
        load_llm_adapters_json(_write(tmp_path, "trunc.json", json.dumps(recs)[:-5]))
    with pytest.raises(ValueError, match=r"list\.json: record 1 is a JSON list, expected an object"):
        load_llm_adapters_json(_write(tmp_path, "list.json", [_good(0), ["x"]]))


def test_llm_adapters_missing_input_is_empty_and_extra_fields_dropped(tmp_path):
    rec = _good(1)
    del rec["input"]
    rec["id"] = 7
    (out,) = load_llm_adapters_json(_write(tmp_path, "a.json", [rec]))
    assert out == {**_good(1), "input": ""} and list(out) == list(FIELDS)


# -------------------------------------------------------------------------------------------------- GSM8K
def test_gsm8k_known_record(gsm):
    # raw: "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n...= <<48+24=72>>72 clips ...\n#### 72"
    assert gsm[0] == {
        "instruction": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
                       "May. How many clips did Natalia sell altogether in April and May?",
        "input": "",
        "output": "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n"
                  "The answer is 72.",
        "answer": "72",
    }


def test_gsm8k_whole_train_file(gsm, gsm_raw):
    assert len(gsm) == len(gsm_raw) == 7473
    with_commas = 0
    for rec, raw in zip(gsm, gsm_raw):
        final = raw["answer"].split("####")[-1].strip()
        with_commas += "," in final
        assert rec["answer"] == final.replace(",", "")
        assert rec["instruction"] == raw["question"].strip()
        assert rec["output"].endswith(f"The answer is {rec['answer']}.")
        assert "<<" not in rec["output"] and ">>" not in rec["output"] and "####" not in rec["output"]
        # one line per solution line: the "#### N" line became the final sentence
        assert rec["output"].count("\n") == raw["answer"].strip().count("\n")
        # the evaluation's rule (remove commas, last number) reads the label back
        assert float(NUMBER.findall(rec["output"].replace(",", ""))[-1]) == float(rec["answer"])
    assert with_commas == 79  # e.g. "#### 1,080"
    # the first "#### 1,080": raw "... = $<<40/10=4>>4.\n... = $<<40-4=36>>36.\n... = $<<36*30=1080>>1080.\n#### 1,080"
    rec = next(r for r, raw in zip(gsm, gsm_raw) if raw["answer"].endswith("#### 1,080"))
    assert rec["answer"] == "1080"
    assert rec["output"] == ("The amount of money deducted from Adam's daily pay is $40 / 10 = $4.\n"
                             "So after deducting 10%, Adam\u2019s daily pay is $40 \u2013 $4 = $36.\n"
                             "This means that in 30 days he earns $36 * 30 = $1080.\nThe answer is 1080.")


def test_gsm8k_test_jsonl_agrees_with_llm_adapters_copy(real_data_dir):
    # Two sources of the same 1,319 questions (README: 0 final-answer mismatches) cross-check the "####" parsing.
    ours = load_gsm8k_jsonl(real_data_dir / "gsm8k_openai" / "test.jsonl")
    theirs = load_llm_adapters_json(real_data_dir / "gsm8k" / "test.json")
    assert len(ours) == len(theirs) == 1319
    label = {normalize_question(r["instruction"]): float(r["answer"]) for r in theirs}
    assert all(float(r["answer"]) == label[normalize_question(r["instruction"])] for r in ours)


def test_gsm8k_malformed(tmp_path):
    ok = json.dumps({"question": "Q?", "answer": "1+1=<<1+1=2>>2\n#### 2"})
    with pytest.raises(ValueError, match=r"g\.jsonl: line 3 lacks field 'answer'"):
        load_gsm8k_jsonl(_write(tmp_path, "g.jsonl", f"{ok}\n{ok}\n{json.dumps({'question': 'Q?'})}\n"))
    with pytest.raises(ValueError, match=r"h\.jsonl: line 2: the solution's last line .* is not '#### <number>'"):
        load_gsm8k_jsonl(_write(tmp_path, "h.jsonl", f"{ok}\n{json.dumps({'question': 'Q', 'answer': '2'})}\n"))
    with pytest.raises(ValueError, match=r"i\.jsonl: line 2 is not valid JSON"):
        load_gsm8k_jsonl(_write(tmp_path, "i.jsonl", f"{ok}\n{{oops\n"))
    with pytest.raises(ValueError, match=r"e\.jsonl: no records"):
        load_gsm8k_jsonl(_write(tmp_path, "e.jsonl", "\n"))
    (rec,) = load_gsm8k_jsonl(_write(tmp_path, "ok.jsonl", f"\n{ok}\n\n"))  # blank lines are skipped
    assert rec["output"] == "1+1=2\nThe answer is 2." and rec["answer"] == "2"


# -------------------------------------------------------------------------------------------------- MAWPS
def test_mawps_to_record_forms():
    r = mawps_to_record({"original_text": "Each ticket costs $ 9.00 .  How much do 4 tickets cost ?",
                         "equation": "X=(9.0*4.0)", "ans": 36.0})
    assert r == {"instruction": "Each ticket costs $ 9.00 . How much do 4 tickets cost ?", "input": "",
                 "output": "x = 9 * 4 = 36. The answer is 36.", "answer": "36"}
    r = mawps_to_record({"original_text": "q", "equation": "X-6=52", "ans": "58"})
    assert r["output"] == "x - 6 = 52, so x = 58. The answer is 58."
    # ans written with 2 decimals is the equation's value rounded: accepted, stated as written
    r = mawps_to_record({"original_text": "q", "equation": "x=0.8*0.6667", "ans": 0.53})
    assert r["output"] == "x = 0.8 * 0.6667 = 0.53. The answer is 0.53."
    r = mawps_to_record({"original_text": "q", "equation": "number=1.477/-7.0", "ans": -0.211})
    assert r["output"] == "number = 1.477 / -7 = -0.211. The answer is -0.211."


@pytest.mark.parametrize("equation, ans, why", [
    ("X=0.32=0.21", "0.53", "2 '=' signs"),
    ("x=1222-513", 208.0, "evaluates to 709"),
    ("x=2**3", 8.0, "Pow"),
    ("x=__import__('os').getpid()", 1.0, "not allowed"),
    ("x=4/0", 1.0, "division by zero"),
    ("x=y+1", 1.0, "one unknown"),
    ("x=(1", 1.0, "does not parse"),
])
def test_mawps_to_record_rejects(equation, ans, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        mawps_to_record({"original_text": "q", "equation": equation, "ans": ans})


def _py_eval(expr: str) -> float:
    assert re.fullmatch(r"[-+*/(). \d]+", expr), expr  # only arithmetic reaches eval
    return eval(expr)  # noqa: S307 (checked above)


def test_mawps_train_rationales_evaluate_to_ans(mawps, mawps_train_path):
    raw = json.loads(mawps_train_path.read_text())
    kept = [r for r in raw if r["id"] not in MAWPS_BAD_IDS]
    assert len(raw) == 1898 and len(mawps) == len(kept) == 1878
    explicit = re.compile(r"([a-z]+) = (.+) = (-?[\d.]+)\. The answer is (-?[\d.]+)\.")
    implicit = re.compile(r"(.+) = (.+), so ([a-z]+) = (-?[\d.]+)\. The answer is (-?[\d.]+)\.")
    exact = 0
    for rec, src in zip(mawps, kept):
        assert rec["instruction"] == " ".join(src["original_text"].split())
        ans = float(src["ans"])
        assert abs(float(rec["answer"]) - ans) <= 5e-5  # at most 4 decimals kept
        if m := explicit.fullmatch(rec["output"]):
            _, expr, stated, final = m.groups()
            value = _py_eval(expr)
        else:
            m = implicit.fullmatch(rec["output"])
            assert m, rec["output"]
            lhs, rhs, var, stated, final = m.groups()
            x = float(stated)
            value = x if abs(_py_eval(lhs.replace(var, f"({x})")) - _py_eval(rhs.replace(var, f"({x})"))) < 1e-2 \
                else float("nan")
        assert stated == final == rec["answer"]
        # the arithmetic gives ans: exactly, or up to ans's own rounding / MAWPS's 0.6667-for-2/3 constants
        assert abs(value - ans) <= max(5e-3, 1e-3 * abs(ans)), (rec["output"], src["ans"])
        exact += abs(value - ans) <= 1e-6 * max(1.0, abs(ans))
    assert exact == 1847, exact  # the other 31: ans rounded (0.53 for 0.53336) or 0.6667-for-2/3 constants


def test_mawps_train_drops_bad_records_with_a_logged_count(caplog, mawps_train_path):
    with caplog.at_level(logging.WARNING, logger="lowbit.data.mawps"):
        load_mawps_train(mawps_train_path)
    assert "dropped 20 of 1898 MAWPS records" in caplog.text and "X=0.32=0.21" in caplog.text


def test_mawps_missing_field(tmp_path, mawps_train_path):
    raw = json.loads(mawps_train_path.read_text())[:5]
    del raw[3]["equation"]
    with pytest.raises(ValueError, match=r"m\.json: record 3 lacks field 'equation'"):
        load_mawps_train(_write(tmp_path, "m.json", raw))


# ---------------------------------------------------------------------------------------- dispatch, mixing
def test_load_source_dispatch(tmp_path, gsm, mawps, real_data_dir, gsm_train_path, mawps_train_path):
    assert load_source(gsm_train_path) == gsm
    assert load_source(str(mawps_train_path)) == mawps  # sniffed from its fields
    svamp_path = real_data_dir / "SVAMP" / "test.json"
    svamp = load_llm_adapters_json(svamp_path)
    assert load_source(svamp_path) == load_source({"path": svamp_path}) == svamp
    assert load_source({"path": mawps_train_path, "format": "mawps"}) == mawps
    with pytest.raises(ValueError, match="unknown source format 'csv'"):
        load_source({"path": mawps_train_path, "format": "csv"})
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_source(_write(tmp_path, "data.txt", "[]"))
    with pytest.raises(FileNotFoundError):
        load_source(tmp_path / "nope.json")


def test_mix_sources_amounts_and_determinism():
    a = [_good(i) for i in range(100)]
    b = [{**_good(i), "instruction": f"B{i}"} for i in range(10)]
    ds = mix_sources([(a, 30), (b, 2.0)], seed=1)
    assert isinstance(ds, datasets.Dataset) and ds.column_names == list(FIELDS)
    assert len(ds) == 30 + 20
    instr = ds["instruction"]
    assert sum(s.startswith("B") for s in instr) == 20 and len({s for s in instr if s.startswith("B")}) == 10
    assert len({s for s in instr if not s.startswith("B")}) == 30  # max_n samples without replacement
    assert mix_sources([(a, 30), (b, 2.0)], seed=1)["instruction"] == instr
    assert mix_sources([(a, 30), (b, 2.0)], seed=2)["instruction"] != instr
    assert len(mix_sources([(a, 0.25), (b, None)])) == 25 + 10
    assert len(mix_sources([(a, 1000)])) == 100
    for bad in (-1, True, "10"):
        with pytest.raises(ValueError, match="amount"):
            mix_sources([(a, bad)])
    with pytest.raises(ValueError, match="no records"):
        mix_sources([([], None)])
    with pytest.raises(ValueError, match="source 1 of mix_sources: record 0 lacks field 'answer'"):
        mix_sources([(a, None), ([{"instruction": "q", "output": "o"}], None)])
    with pytest.raises(ValueError, match="no records"):
        mix_sources([(a, 0)])


# ----------------------------------------------------------------------------------------- test-set overlap
def test_substitute_sources_vs_test_sets(gsm, mawps, tests4, real_data_dir):
    check_no_test_overlap(gsm, tests4)  # GSM8K train shares no question with the four test sets
    overlap = find_test_overlap(mawps, tests4)
    assert {k: len(v) for k, v in overlap.items()} == {"mawps": 27}
    with pytest.raises(ValueError, match=r"mawps: 27"):
        check_no_test_overlap(mawps, tests4)
    # MAWPS train vs the three sets the paper does not report (as the data directory's README says): heavy overlap
    others = load_test_sets(real_data_dir, ("AddSub", "MultiArith", "SingleEq"))
    assert {k: len(v) for k, v in find_test_overlap(mawps, others).items()} == {
        "AddSub": 411, "MultiArith": 484, "SingleEq": 533}


def test_overlap_ignores_case_whitespace_punctuation_spacing():
    train = [_good(1), {**_good(2), "instruction": "Joan has 10 books . Tom has 38 books .  How many ?"}]
    test = {"t": [{"instruction": "joan has 10 books. Tom has 38 books.\nHow many?", "answer": "48"}]}
    assert find_test_overlap(train, test) == {"t": [1]}
    with pytest.raises(ValueError, match=r"t: 1 training records.*record 1 'Joan has 10 books"):
        check_no_test_overlap(train, test)
    check_no_test_overlap(train[:1], test)


def test_substitute_only_when_named_and_without_test_questions(tmp_path, caplog, tests4, real_data_dir):
    missing = tmp_path / "math_10k.json"
    with pytest.raises(FileNotFoundError, match=r"math_10k\.json not found.*source='gsm8k-mawps'"):
        default_math_training_set(real_data_dir, math10k_path=missing, seed=0)  # never the substitute in its place
    with pytest.raises(ValueError, match="not read by the substitute"):
        default_math_training_set(real_data_dir, math10k_path=missing, source="gsm8k-mawps")
    with caplog.at_level(logging.WARNING, logger="lowbit.data.loaders"):
        ds = default_math_training_set(real_data_dir, source="gsm8k-mawps", seed=0)
    assert "training on the substitute gsm8k-mawps" in caplog.text
    assert "dropped 27 training records whose question is in a test set (mawps: 27)" in caplog.text
    assert isinstance(ds, datasets.Dataset) and ds.column_names == list(FIELDS)
    assert len(ds) == 7473 + 1878 - 619 - 27  # the validation sets' 619 records held out (test_validation_split)
    records = ds.to_list()
    check_no_test_overlap(records, tests4)
    assert all(r["output"].endswith(f"The answer is {r['answer']}.") for r in records)
    assert default_math_training_set(real_data_dir, source="gsm8k-mawps",
                                     seed=0)["instruction"][:50] == ds["instruction"][:50]


def test_default_training_set_uses_math10k_and_handles_its_overlap(tmp_path, caplog, tests4, real_data_dir):
    leaked = {**tests4["SVAMP"][0], "output": "leaked. The answer is 4."}
    p = _write(tmp_path, "math_10k.json", [_good(i) for i in range(5)] + [leaked])
    with caplog.at_level(logging.WARNING, logger="lowbit.data.loaders"):
        ds = default_math_training_set(real_data_dir, math10k_path=p)
    assert len(ds) == 5 and "SVAMP: 1" in caplog.text and "substitute" not in caplog.text
    assert len(default_math_training_set(real_data_dir, math10k_path=p, on_overlap="keep")) == 6
    with pytest.raises(ValueError, match="SVAMP: 1"):
        default_math_training_set(real_data_dir, math10k_path=p, on_overlap="error")
    with pytest.raises(FileNotFoundError, match="test_sets=()"):
        default_math_training_set(tmp_path, math10k_path=p)
    assert len(default_math_training_set(tmp_path, math10k_path=p, test_sets=())) == 6


def test_calibration_source_under_the_data_directory(tmp_path, monkeypatch):
    """``data:<path>`` names a file under $LOWBIT_DATA_DIR (recipes carry no absolute paths); a missing
    directory or file is a clear error."""
    from lowbit.data.calibration import load_texts

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "t.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n')
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(tmp_path))
    assert len(load_texts("data:sub/t.jsonl")) == 1
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_texts("data:sub/none.jsonl")
    monkeypatch.delenv("LOWBIT_DATA_DIR")
    import lowbit.data.testsets as ts

    monkeypatch.setattr(ts, "CHECKOUT_DATA_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="LOWBIT_DATA_DIR"):
        load_texts("data:sub/t.jsonl")
