"""The evaluation-set registry (lowbit.data.testsets): registration, the data directory default, test-file reading.

Everything here uses ``tmp_path`` files or file-free sets: no real data needed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lowbit.data import synthetic, testsets
from lowbit.data.testsets import (
    ALL_TEST_SETS,
    PAPER_TEST_SETS,
    DatasetSpec,
    default_data_dir,
    display_name,
    eval_set,
    kind_of,
    known_datasets,
    load_records,
    load_test_sets,
    register_eval_set,
    resolve_datasets,
    unregister_eval_set,
)


def _rec(i: int) -> dict:
    return {"instruction": f"What is {i} + 1?", "input": "", "output": f"The answer is {i + 1}.", "answer": str(i + 1)}


def _data_dir(tmp_path: Path, folders=("gsm8k", "SVAMP", "mawps", "AQuA"), n: int = 3) -> Path:
    for folder in folders:
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "test.json").write_text(json.dumps([_rec(i) for i in range(n)]))
    return tmp_path


@pytest.fixture
def toy_set():
    """A file-free set registered for one test, removed afterwards."""
    def toy(limit, seed):
        return [{"instruction": f"toy {seed} {i}", "answer": "ABCDE"[i % 5]} for i in range(limit or 7)]

    register_eval_set("toy-choice", display="Toy", kind="choice", loader=toy)
    yield "toy-choice"
    unregister_eval_set("toy-choice")


def test_builtin_table():
    assert known_datasets() == ["gsm8k", "svamp", "mawps", "aqua", "addsub", "multiarith", "singleeq",
                                "synthetic-gsm8k", "synthetic-svamp", "synthetic-mawps", "synthetic-aqua",
                                "synthetic-gsm8k-val", "synthetic-svamp-val", "synthetic-mawps-val",
                                "synthetic-aqua-val", "gsm8k-val", "mawps-val"]
    assert PAPER_TEST_SETS == ("gsm8k", "svamp", "mawps", "aqua") and ALL_TEST_SETS == tuple(known_datasets()[:7])
    assert [n.removeprefix("synthetic-") for n in known_datasets()[7:11]] == list(synthetic.FAMILIES)
    assert [n.removesuffix("-val") for n in known_datasets()[11:15]] == known_datasets()[7:11]
    assert [eval_set(n).files[:2] for n in known_datasets()[15:]] == [("gsm8k_openai/train.jsonl",
                                                                       "mawps/trainset.json")] * 2
    assert kind_of("aqua") == kind_of("AQuA") == kind_of("synthetic-aqua") == "choice"
    assert kind_of("gsm8k") == kind_of("synthetic-mawps") == kind_of("not-a-set") == "numeric"
    assert display_name("svamp") == "SVAMP" and display_name("synthetic-aqua") == "syn-AQuA"
    assert display_name("synthetic-other") == "syn-other" and display_name("other") == "other"
    assert eval_set("SVAMP") == eval_set("svamp") and eval_set("svamp").folder == "SVAMP"


def test_registered_set_is_resolved_and_loaded(toy_set, tmp_path):
    assert toy_set in known_datasets() and kind_of(toy_set) == "choice" and display_name(toy_set) == "Toy"
    (spec,) = resolve_datasets([" Toy-Choice "])  # no data directory needed for a set without files
    assert spec == DatasetSpec("toy-choice", "Toy", "choice")
    records = load_records(spec)
    assert len(records) == 7 and records[0] == {"instruction": "toy 0 0", "input": "", "output": "", "answer": "A"}
    assert [r["instruction"] for r in load_records(spec, limit=3, synthetic_seed=2)] == ["toy 2 0", "toy 2 1",
                                                                                        "toy 2 2"]


def test_set_made_by_a_reader_from_data_directory_files(tmp_path):
    """A ``reader`` set (like gsm8k-val) reads the data directory given to resolve_datasets; its ``files`` are
    checked there up front, naming the missing one."""
    def read(data_dir: Path) -> list[dict]:
        return json.loads((data_dir / "toy" / "pool.json").read_text())

    register_eval_set("toy-read-val", display="Toy-val", reader=read, files=["toy/pool.json"])
    try:
        with pytest.raises(ValueError, match=r"dataset 'toy-read-val': .*toy/pool\.json not found; 'toy-read-val' "
                                             r"is made from toy/pool\.json in the data directory"):
            resolve_datasets(["toy-read-val"], tmp_path)
        (tmp_path / "toy").mkdir()
        (tmp_path / "toy" / "pool.json").write_text(json.dumps([_rec(i) for i in range(4)]))
        (spec,) = resolve_datasets(["toy-read-val"], tmp_path)
        assert spec == DatasetSpec("toy-read-val", "Toy-val", "numeric", data_dir=tmp_path)
        assert load_records(spec, limit=3) == [_rec(i) for i in range(3)]
    finally:
        unregister_eval_set("toy-read-val")


def test_unregistered_set_is_unknown():
    register_eval_set("toy-gone", loader=lambda limit, seed: [])
    assert unregister_eval_set("toy-gone").name == "toy-gone"
    with pytest.raises(ValueError, match="unknown dataset 'toy-gone'"):
        resolve_datasets(["toy-gone"])


def test_decorator_form_and_bad_loader_output():
    @register_eval_set("toy-numeric", display="ToyN")
    def toy(limit, seed):
        return [{"instruction": "q"}]  # no answer

    try:
        assert toy([], 0) and eval_set("toy-numeric").loader is toy and kind_of("toy-numeric") == "numeric"
        (spec,) = resolve_datasets(["toy-numeric"])
        with pytest.raises(ValueError, match=r"dataset 'toy-numeric': .*record 0 lacks field 'answer'"):
            load_records(spec)
    finally:
        unregister_eval_set("toy-numeric")
    assert "toy-numeric" not in known_datasets()


@pytest.mark.parametrize("kw, match", [
    ({"name": "gsm8k", "folder": "x"}, "already registered"),
    ({"name": "Upper", "folder": "x"}, "lowercase"),
    ({"name": "a,b", "folder": "x"}, "commas"),
    ({"name": "toy", "kind": "text", "folder": "x"}, "kind must be one of numeric, choice"),
    ({"name": "toy", "folder": "x", "loader": lambda limit, seed: []}, "not both"),
    ({"name": "toy", "loader": lambda limit, seed: [], "reader": lambda data_dir: []}, "a loader or a reader"),
])
def test_register_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        register_eval_set(**kw)
    assert "toy" not in known_datasets()
    with pytest.raises(ValueError, match="not registered"):
        unregister_eval_set("toy")


def test_replace_keeps_a_set_redefinable():
    original = eval_set("mawps")
    try:
        register_eval_set("mawps", display="MAWPS-2", folder="mawps2", replace=True)
        assert display_name("mawps") == "MAWPS-2"
    finally:
        register_eval_set("mawps", display=original.display, folder=original.folder,
                          references=original.references, replace=True)
    assert eval_set("mawps") == original


# -------------------------------------------------------------------------------------------- data directory
def test_default_data_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(tmp_path / "nowhere"))  # returned as given: the caller reports it
    assert default_data_dir() == tmp_path / "nowhere"
    monkeypatch.delenv("LOWBIT_DATA_DIR")
    monkeypatch.setattr(testsets, "CHECKOUT_DATA_DIR", tmp_path)
    assert default_data_dir() == tmp_path
    monkeypatch.setattr(testsets, "CHECKOUT_DATA_DIR", tmp_path / "absent")
    assert default_data_dir() is None


def test_checkout_default_is_beside_the_repository():
    assert testsets.CHECKOUT_DATA_DIR == Path(testsets.__file__).resolve().parents[3] / "shared" / "data"
    assert (testsets.REPO_ROOT / "lowbit" / "data" / "testsets.py").is_file()


def test_resolve_uses_the_default_data_dir(monkeypatch, tmp_path):
    data = _data_dir(tmp_path / "d")
    monkeypatch.delenv("LOWBIT_DATA_DIR", raising=False)
    monkeypatch.setattr(testsets, "CHECKOUT_DATA_DIR", data)
    specs = resolve_datasets(["gsm8k", "synthetic-aqua", "AQuA"])
    assert [(s.name, s.display, s.kind, s.path, s.family) for s in specs] == [
        ("gsm8k", "GSM8K", "numeric", data / "gsm8k" / "test.json", None),
        ("synthetic-aqua", "syn-AQuA", "choice", None, "aqua"),
        ("aqua", "AQuA", "choice", data / "AQuA" / "test.json", None)]
    monkeypatch.setattr(testsets, "CHECKOUT_DATA_DIR", tmp_path / "absent")
    with pytest.raises(ValueError, match="none was given") as e:
        resolve_datasets(["gsm8k"])
    msg = str(e.value)
    assert "--data-dir" in msg and "LOWBIT_DATA_DIR" in msg and "synthetic-gsm8k" in msg and "absent" in msg
    assert "gsm8k/test.json, SVAMP/test.json, mawps/test.json, AQuA/test.json" in msg
    assert [s.name for s in resolve_datasets(["synthetic-mawps"])] == ["synthetic-mawps"]  # no directory needed


def test_resolve_errors(tmp_path, monkeypatch):
    data = _data_dir(tmp_path / "d", folders=("gsm8k", "svamp"))  # another capitalisation is tolerated
    assert resolve_datasets(["svamp"], data)[0].path == data / "svamp" / "test.json"
    with pytest.raises(ValueError, match=r"dataset 'mawps': .*mawps/test\.json not found"):
        resolve_datasets(["gsm8k", "mawps"], data)
    with pytest.raises(ValueError, match=r"--data-dir .*nowhere.* is not a directory"):
        resolve_datasets(["gsm8k"], tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown dataset 'gsm9k'"):
        resolve_datasets(["gsm9k"], data)
    with pytest.raises(ValueError, match="no dataset given"):
        resolve_datasets([" "], data)


# ----------------------------------------------------------------------------------------------- test files
def test_load_records_of_a_test_file(tmp_path):
    data = _data_dir(tmp_path, folders=("gsm8k",), n=5)
    (spec,) = resolve_datasets(["gsm8k"], data)
    assert load_records(spec) == [_rec(i) for i in range(5)]
    assert load_records(spec, limit=2) == [_rec(0), _rec(1)]
    with pytest.raises(ValueError, match="--limit must be >= 1"):
        load_records(spec, limit=0)
    # test records need only instruction and answer; missing input/output are "", extra fields dropped
    spec.path.write_text(json.dumps([{"instruction": "q", "answer": "1", "id": 3}]))
    assert load_records(spec) == [{"instruction": "q", "input": "", "output": "", "answer": "1"}]


@pytest.mark.parametrize("content, match", [
    ("[{", r"not valid JSON"),
    ('{"data": []}', r"expected a JSON array of records, found a JSON dict"),
    ('[{"instruction": "q"}]', r"record 0 lacks field 'answer'"),
    ('[{"instruction": "q", "answer": 1}]', r"record 0 field 'answer' is a int"),
])
def test_load_records_errors_name_set_file_and_record(tmp_path, content, match):
    data = _data_dir(tmp_path, folders=("mawps",))
    (spec,) = resolve_datasets(["mawps"], data)
    spec.path.write_text(content)
    with pytest.raises(ValueError, match=rf"^dataset 'mawps': {re.escape(str(spec.path))}: .*{match}"):
        load_records(spec)


def test_synthetic_records_are_the_synthetic_test_split():
    (spec,) = resolve_datasets(["synthetic-gsm8k"])
    assert load_records(spec, limit=4, synthetic_seed=1) == synthetic.test_split("gsm8k", 4, seed=1)
    assert len(load_records(spec)) == 500


def test_load_test_sets_by_name_or_folder(tmp_path):
    data = _data_dir(tmp_path)
    sets = load_test_sets(data, PAPER_TEST_SETS)
    assert list(sets) == ["gsm8k", "SVAMP", "mawps", "AQuA"]  # keyed by folder
    assert load_test_sets(data, ("svamp",)) == load_test_sets(data, ("SVAMP",)) == {"SVAMP": sets["SVAMP"]}
    with pytest.raises(FileNotFoundError, match=r"AddSub/test\.json not found"):
        load_test_sets(data, ("addsub",))
    with pytest.raises(ValueError, match="has no test file"):
        load_test_sets(data, ("synthetic-gsm8k",))


def test_mawps_reference_rationales_from_its_equations(real_data_dir):
    """MAWPS's test.json has no rationales; the response loss takes them from testset.json's equations, whose
    final number is the record's answer."""
    from lowbit.data.records import format_number

    (spec,) = testsets.resolve_datasets(["mawps"], real_data_dir)
    plain = testsets.load_records(spec)
    refs = testsets.load_reference_records(spec)
    assert not any(r["output"].strip() for r in plain) and len(refs) == len(plain) == 238
    with_ref = [r for r in refs if r["output"].strip()]
    assert len(with_ref) >= 230
    for r in with_ref:
        assert r["output"].endswith(f"The answer is {format_number(float(r['answer']))}."), r
    # Sets that ship rationales are untouched.
    (gsm,) = testsets.resolve_datasets(["gsm8k"], real_data_dir)
    assert testsets.load_reference_records(gsm, 5) == testsets.load_records(gsm, 5)


def test_mawps_references_refuse_a_mismatched_split(tmp_path):
    from lowbit.data.mawps import equation_rationales

    rec = {"instruction": "Tom has 3 apples and buys 4 . How many now ?", "input": "", "output": "", "answer": "7"}
    test_file = tmp_path / "test.json"
    with pytest.raises(ValueError, match="testset.json"):
        equation_rationales([rec], test_file)
    raw = {"original_text": "Tom has 3 apples and buys 4 . How many now ?", "equation": "x=3+4", "ans": 7}
    (tmp_path / "testset.json").write_text(json.dumps([raw]))
    assert equation_rationales([rec], test_file)[0]["output"] == "x = 3 + 4 = 7. The answer is 7."
    (tmp_path / "testset.json").write_text(json.dumps([{**raw, "original_text": "Another problem ?"}]))
    with pytest.raises(ValueError, match="does not match"):
        equation_rationales([rec], test_file)
