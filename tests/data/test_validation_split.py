"""The validation sets ``gsm8k-val`` and ``mawps-val`` (lowbit.data.validation): carved from the real training files,
held out of the ``gsm8k-mawps`` training pool and of calibration text, disjoint from every test file; and the
synthetic sets' limits.

Questions are compared by :func:`lowbit.data.records.question_key` (lowercase, letters and digits only), which is
stricter than comparing with whitespace and case normalised: two questions equal under the latter are equal under
it. Tests of the real files skip (with the reason) when the data directory lacks them; the others use ``tmp_path``
files and always run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lowbit.data import validation
from lowbit.data.calibration import load_texts
from lowbit.data.gsm8k import load_gsm8k_jsonl
from lowbit.data.loaders import SUBSTITUTE, default_math_training_set
from lowbit.data.mawps import load_mawps_train
from lowbit.data.records import load_llm_adapters_json, normalize_question, question_key
from lowbit.data.synthetic import FAMILIES, problem_key
from lowbit.data.testsets import ALL_TEST_SETS, load_records, resolve_datasets
from lowbit.data.validation import VALIDATION_SETS, split_relpaths, validation_split
from lowbit.recipes.config import CONFIG_DIR, load_recipe
from lowbit.recipes.training_data import load_training_records, training_set_record

SMOLLM2 = sorted(p.stem for p in CONFIG_DIR.glob("smollm2-*.yaml"))
TINY = sorted(p.stem for p in CONFIG_DIR.glob("tiny-*.yaml"))
# The tiny recipes' training records (train_split(10000, seed 0)), recorded before the validation split existed: a
# long experiment depends on these exact records.
TINY_RECORDS_SHA256 = "7526529c4841a13aefcba9ae70f050f8452b99f9cf57b3c81462e6d2374aacc5"


# ------------------------------------------------------------------------------------------------ real files
@pytest.fixture(scope="module")
def split_dir(real_data_dir) -> Path:
    missing = [p.as_posix() for p in split_relpaths() if not (real_data_dir / p).is_file()]
    if missing:
        pytest.skip(f"the data directory {real_data_dir} lacks {', '.join(missing)} (the validation split's files)")
    return real_data_dir


@pytest.fixture(scope="module")
def split(split_dir) -> dict[str, list[dict]]:
    return validation_split(split_dir)


@pytest.fixture(scope="module")
def val_keys(split) -> set[str]:
    return {question_key(r) for recs in split.values() for r in recs}


@pytest.fixture(scope="module")
def test_keys(split_dir) -> dict[str, set[str]]:
    """Every real test file's questions: the seven LLM-Adapters sets, GSM8K's own test split, MAWPS's."""
    extra = [p for p in ("gsm8k_openai/test.jsonl", "mawps/testset.json") if not (split_dir / p).is_file()]
    if extra:
        pytest.skip(f"the data directory {split_dir} lacks {', '.join(extra)}")
    out = {n: {question_key(r) for r in load_llm_adapters_json(split_dir / p, required=("instruction",))}
           for n, p in zip(ALL_TEST_SETS, split_relpaths()[2:], strict=True)}
    out["gsm8k_openai/test.jsonl"] = {question_key(r) for r in load_gsm8k_jsonl(split_dir / "gsm8k_openai/test.jsonl")}
    raw = json.loads((split_dir / "mawps" / "testset.json").read_text())
    out["mawps/testset.json"] = {question_key(r) for r in raw}
    return out


def test_the_split_is_the_documented_slice(split, split_dir, test_keys):
    """gsm8k-val: the last 300 records of GSM8K train; mawps-val: the last 300 usable MAWPS train records whose
    question is in no test file (one per question), in file order; every record has a question, an answer and a
    reference rationale ending in that answer."""
    gsm = load_gsm8k_jsonl(split_dir / "gsm8k_openai" / "train.jsonl")
    assert split["gsm8k-val"] == gsm[-300:]
    mawps = load_mawps_train(split_dir / "mawps" / "trainset.json")
    tests = set().union(*test_keys.values())
    first = mawps.index(split["mawps-val"][0])
    assert first == 968  # usable records 969 to 1,878
    chosen = {question_key(r) for r in split["mawps-val"]}
    skipped = [r for r in mawps[first:] if r not in split["mawps-val"]]
    assert len(split["mawps-val"]) == len(chosen) == 300 and all(r in mawps for r in split["mawps-val"])
    assert all(question_key(r) in tests or question_key(r) in chosen for r in skipped)  # nothing else skipped
    assert sum(question_key(r) in tests for r in skipped) == len(skipped) == 604  # test questions: left out
    for recs in split.values():
        assert all(r["instruction"].strip() and r["output"].endswith(f"The answer is {r['answer']}.") for r in recs)


def test_registered_sets_load_through_the_data_directory(split, split_dir, monkeypatch):
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(split_dir))
    specs = resolve_datasets(list(VALIDATION_SETS))
    assert [(s.name, s.display, s.kind) for s in specs] == [("gsm8k-val", "GSM8K-val", "numeric"),
                                                            ("mawps-val", "MAWPS-val", "numeric")]
    assert all(s.name.endswith("-val") for s in specs)  # what the experiment spec's lr search requires
    for s in specs:
        assert load_records(s) == split[s.name] and load_records(s, limit=5) == split[s.name][:5]


@pytest.mark.parametrize("name", list(VALIDATION_SETS))
def test_validation_shares_no_question_with_any_test_file(name, split, test_keys):
    keys = {question_key(r) for r in split[name]}
    assert len(test_keys) == 9
    assert {t: len(keys & k) for t, k in test_keys.items() if keys & k} == {}


def test_validation_is_not_in_the_training_records_of_any_smollm2_recipe(val_keys, split_dir, monkeypatch, caplog):
    """The records each smollm2 recipe trains on, and the whole pool they are drawn from (any num_examples and
    seed), hold no validation question; the pool lost exactly the 619 records of those questions."""
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(split_dir))
    assert len(SMOLLM2) == 18  # every smollm2-* recipe, QWHA included
    configs = {}
    for name in SMOLLM2:
        cfg = load_recipe(name)
        assert cfg.data.source == SUBSTITUTE
        configs.setdefault(repr(cfg.data), cfg)
    for cfg in configs.values():
        used = load_training_records(cfg)
        assert len(used) == cfg.data.num_examples and not {question_key(r) for r in used} & val_keys
    with caplog.at_level(logging.INFO, logger="lowbit.data.loaders"):
        pool = load_training_records(load_recipe(SMOLLM2[0], ["data.num_examples=null", "data.seed=3"]))
    assert "held out 619 training records for the validation sets gsm8k-val, mawps-val" in caplog.text
    assert len(pool) == 7473 + 1878 - 619 - 27 and not {question_key(r) for r in pool} & val_keys


def _needs_smollm2_tokenizer():
    from lowbit.recipes.loading import resolve_model

    try:
        path, _ = resolve_model("smollm2-135m")
    except ValueError as e:
        pytest.skip(f"the smollm2-135m tokenizer is not available: {e}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_validation_is_not_in_the_calibration_windows_of_any_smollm2_recipe(split, val_keys, split_dir, monkeypatch,
                                                                            tmp_path):
    """No calibration window of the smollm2 recipes' settings (decoded with their tokenizer) holds a validation
    question, nor its first or last 60 letters and digits (a question cut by a window edge); no calibration
    document holds one. The check itself finds them in a copy of the file that is not the training file."""
    from lowbit.recipes.quantize import calibration_windows

    monkeypatch.setenv("LOWBIT_DATA_DIR", str(split_dir))
    settings = {repr(c): c for c in (load_recipe(n).calibration for n in SMOLLM2)}
    assert [c.sources for c in settings.values()] == [["data:gsm8k_openai/train.jsonl"]]
    tok = _needs_smollm2_tokenizer()
    parts = {k[:60] for k in val_keys} | {k[-60:] for k in val_keys}
    for c in settings.values():
        windows, _ = calibration_windows(c, tok)
        assert windows.shape == (c.nsamples, c.seqlen)
        texts = [normalize_question(tok.decode(w)) for w in windows]
        assert [p for p in parts if any(p in t for t in texts)] == []
        docs = [d for s in c.sources for d in load_texts(s)]
        assert len(docs) == 7473 - 300
        whole = normalize_question("\n\n".join(docs))
        assert [k for k in val_keys if k in whole] == []
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes((split_dir / "gsm8k_openai" / "train.jsonl").read_bytes())
    leaked = normalize_question("\n\n".join(load_texts(str(copy))))
    assert sum(question_key(r) in leaked for r in split["gsm8k-val"]) == 300


def test_mawps_calibration_text_leaves_out_its_validation_records(split_dir, val_keys, monkeypatch):
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(split_dir))
    raw = json.loads((split_dir / "mawps" / "trainset.json").read_text())
    docs = load_texts("data:mawps/trainset.json")
    assert len(docs) == len(raw) - sum(question_key(r) in val_keys for r in raw) == 1898 - 319
    assert not {normalize_question(d.split("\n")[0]) for d in docs} & val_keys  # the first line: original_text


# -------------------------------------------------------------------------------------------------- synthetic
@pytest.fixture(scope="module")
def tiny_stems() -> set[str]:
    """The problem stems of every tiny recipe's training records (one distinct data section: all alike)."""
    configs = {}
    for name in TINY:
        cfg = load_recipe(name)
        assert cfg.data.source == "synthetic"
        configs.setdefault(repr(cfg.data), cfg)
    return {problem_key(r["instruction"]) for cfg in configs.values() for r in load_training_records(cfg)}


def test_tiny_training_records_are_unchanged():
    cfg = load_recipe("tiny-lora-fp")
    records = load_training_records(cfg)
    assert training_set_record(cfg.data, [], records)["records_sha256"] == TINY_RECORDS_SHA256


@pytest.mark.parametrize("family", FAMILIES)
def test_synthetic_test_sets_share_no_stem_with_training_or_validation(family, tiny_stems):
    """``synthetic-<family>`` at its 500-problem limit shares no stem with the tiny training pool nor with any
    family's validation split; a limit past 500 (problems the training data does not exclude) is refused."""
    (spec,) = resolve_datasets([f"synthetic-{family}"])
    test = load_records(spec, limit=500)
    stems = {problem_key(r["instruction"]) for r in test}
    assert len(test) == 500 and len(tiny_stems) == 10000
    assert not stems & tiny_stems
    for other in resolve_datasets([f"synthetic-{f}-val" for f in FAMILIES]):
        assert not stems & {problem_key(r["instruction"]) for r in load_records(other, limit=500)}, other.name
    with pytest.raises(ValueError, match=rf"dataset 'synthetic-{family}': limit 501 is beyond the 500 test "
                                         r"problems .* use limit <= 500"):
        load_records(spec, limit=501)


# ------------------------------------------------------------------------------------- small files, no real data
def _mawps(i: int, text: str) -> dict:
    return {"id": i, "original_text": text, "segmented_text": text, "equation": f"X=({i}.0+1.0)", "ans": i + 1.0}


@pytest.fixture
def small_dir(tmp_path, monkeypatch) -> Path:
    """A data directory with 6 GSM8K and 5 MAWPS training records and the seven test files; validation sets of 2.

    MAWPS: record 4 is an AddSub test question and record 3 repeats record 1's question, so mawps-val is records
    2 and 3 and the training pool also loses record 1."""
    (tmp_path / "gsm8k_openai").mkdir()
    (tmp_path / "gsm8k_openai" / "train.jsonl").write_text("".join(
        json.dumps({"question": f"Ann has {i} apples. How many?", "answer": f"She has {i}.\n#### {i}"}) + "\n"
        for i in range(6)))
    texts = ["Bo has 1 cat .", "Cy has 2 dogs .", "Di has 3 hens .", "cy HAS 2 dogs ?", "Ed has 4 pigs ."]
    (tmp_path / "mawps").mkdir()
    (tmp_path / "mawps" / "trainset.json").write_text(json.dumps([_mawps(i, t) for i, t in enumerate(texts)]))
    for rel in split_relpaths()[2:]:
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        question = "Ed has 4 pigs." if rel.parts[0] == "AddSub" else f"A {rel.parts[0]} question?"
        (tmp_path / rel).write_text(json.dumps([{"instruction": question, "input": "", "answer": "1"}]))
    monkeypatch.setattr(validation, "VALIDATION_N", 2)
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(tmp_path))
    return tmp_path


def test_one_definition_for_the_sets_training_and_calibration(small_dir):
    split = validation_split(small_dir)
    assert [r["instruction"] for r in split["gsm8k-val"]] == ["Ann has 4 apples. How many?",
                                                              "Ann has 5 apples. How many?"]
    assert [r["instruction"] for r in split["mawps-val"]] == ["Di has 3 hens .", "cy HAS 2 dogs ?"]
    assert [r["output"] for r in split["mawps-val"]] == ["x = 2 + 1 = 3. The answer is 3.",
                                                         "x = 3 + 1 = 4. The answer is 4."]
    specs = resolve_datasets(list(VALIDATION_SETS), small_dir)
    assert {s.name: load_records(s) for s in specs} == split
    pool = default_math_training_set(small_dir, source=SUBSTITUTE)["instruction"]
    assert sorted(pool) == sorted([f"Ann has {i} apples. How many?" for i in range(4)] + ["Bo has 1 cat .",
                                                                                          "Ed has 4 pigs ."])
    assert [d.split("\n")[0] for d in load_texts("data:gsm8k_openai/train.jsonl")] == [
        f"Ann has {i} apples. How many?" for i in range(4)]
    assert [d.split("\n")[0] for d in load_texts("data:mawps/trainset.json")] == ["Bo has 1 cat .",
                                                                                   "Ed has 4 pigs ."]


def test_missing_files_are_clear_errors(small_dir, monkeypatch):
    """What is missing, where, and the fix: for the sets (up front, in resolve_datasets), the split itself, the
    substitute training set and calibration text from a training file."""
    (small_dir / "SingleEq" / "test.json").unlink()
    with pytest.raises(ValueError, match=r"dataset 'gsm8k-val': .*SingleEq/test\.json not found; 'gsm8k-val' is made "
                                         r"from gsm8k_openai/train\.jsonl, mawps/trainset\.json, gsm8k/test\.json.* "
                                         r"fix --data-dir/LOWBIT_DATA_DIR"):
        resolve_datasets(["gsm8k-val"], small_dir)
    made_from = (r"validation split \(gsm8k-val, mawps-val, held out of the training files\) is made from "
                 r".*SingleEq/test\.json, which does not exist .*point LOWBIT_DATA_DIR")
    with pytest.raises(FileNotFoundError, match=made_from):
        validation_split(small_dir)
    with pytest.raises(FileNotFoundError, match=made_from):
        default_math_training_set(small_dir, source=SUBSTITUTE)
    with pytest.raises(FileNotFoundError, match=made_from):
        load_texts("data:gsm8k_openai/train.jsonl")
    with pytest.raises(ValueError, match=r"--data-dir '.*absent' is not a directory"):
        resolve_datasets(["mawps-val"], small_dir / "absent")
    monkeypatch.delenv("LOWBIT_DATA_DIR")
    import lowbit.data.testsets as ts

    monkeypatch.setattr(ts, "CHECKOUT_DATA_DIR", small_dir / "absent")
    with pytest.raises(ValueError, match=r"dataset 'mawps-val' is read from a data directory, but none was given"):
        resolve_datasets(["mawps-val"])
