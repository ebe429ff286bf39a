"""`lowbit study`: the validation split never touches the test or training sets, tuning never reads a test
record, the pairs and intervals come out, and a killed study resumes without redoing finished runs."""

import json

import pytest

from lowbit.data.synthetic import FAMILIES, problem_key, test_split, train_split, validation_split
from lowbit.recipes import study as study_mod
from lowbit.recipes.study import PAIRS, StudyBudget, run_study, study_cells


def _stems(recs):
    return {problem_key(r["instruction"]) for r in recs}


def test_validation_split_is_disjoint_from_test_and_training():
    """The validation records (what the learning-rate search scores) share no stem with the test split the study
    evaluates (all 500 per family) nor with the training set it trains on (2,400 records) or the full 10,000."""
    val = {f: validation_split(f, 200) for f in FAMILIES}
    test = set().union(*(_stems(test_split(f, 500)) for f in FAMILIES))
    budget = StudyBudget()
    for n_train in (budget.num_examples, 10000):
        train = _stems(train_split(n_train))
        for f in FAMILIES:
            assert not _stems(val[f]) & test and not _stems(val[f]) & train
    for f in FAMILIES:
        assert len(_stems(val[f])) == 200
        assert validation_split(f, 50) == val[f][:50]  # a longer split extends a shorter one
    from lowbit.data.testsets import load_records, resolve_datasets

    spec = resolve_datasets(["synthetic-aqua-val"])[0]
    assert spec.family == "aqua" and load_records(spec, 10) == val["aqua"][:10]


def test_cells_and_pairs_are_consistent():
    cells = {c.name: c for c in study_cells()}
    for a, b, _ in PAIRS:
        for bits in (2, 4):
            assert a.format(b=bits) in cells and b.format(b=bits) in cells
    # matched pairs really share the base: same quant method after overrides
    from lowbit.recipes.config import load_recipe

    def quant(name):
        c = cells[name]
        return load_recipe(c.recipe, list(c.overrides)).quant.to_dict()

    assert quant("2bit-cloq-gptq") == quant("2bit-gptq-lora")
    assert quant("2bit-cloq") == quant("2bit-gptq-lora-magr") == quant("2bit-diablo") == quant(
        "2bit-diablo-calibrated")
    # equal parameters: DiaBlo N=16 vs LoRA r=10 on the tiny model's q,k,v,up,down (256 wide, 768 intermediate)
    per_layer_diablo = (3 * 256 * 256 + 2 * 768 * 256) // 16
    per_layer_lora = 10 * (3 * (256 + 256) + 2 * (256 + 768))
    assert abs(per_layer_lora / per_layer_diablo - 1) < 0.03
    with pytest.raises(ValueError, match="unknown cells"):
        StudyBudget(cells=("nope",))
    with pytest.raises(ValueError, match="seeds is empty"):
        StudyBudget(seeds=())


TOY = dict(steps=2, batch_size=4, num_examples=8, seeds=(0, 1), seeds_4bit=(0,), bits=(2,),
           lr_grid={"lora": (2e-3, 1e-2), "diablo": (5e-3, 2e-2)}, search_steps=1, n_val=3, n_eval=3,
           max_new_tokens=8, cells=("2bit-gptq-lora", "2bit-cloq-gptq"))


def test_study_tunes_on_validation_only_and_resumes_after_a_kill(tmp_path, monkeypatch):
    """A toy study: search runs score only validation sets and run before any test set is loaded; the report has
    the cells, intervals and the matched pair; a study killed during its 4th run (the second final one), run again,
    trains only that run and the ones after it."""
    from lowbit.data import testsets
    from lowbit.recipes import finetune as ft_mod

    events = []
    real_ft = ft_mod.finetune
    for name in study_mod.TEST_SETS:
        entry = testsets._REGISTRY[name]
        loader = entry.loader

        def spy(limit, seed, _name=name, _loader=loader):
            events.append(("test-load", _name))
            return _loader(limit, seed)

        monkeypatch.setitem(testsets._REGISTRY, name, testsets.EvalSet(entry.name, entry.display, entry.kind,
                                                                      loader=spy))
    kill_at = {"n": 4}

    def fake_finetune(cfg, *a, **k):
        events.append(("run", cfg.output_dir))
        if len([e for e in events if e[0] == "run"]) == kill_at["n"]:
            raise KeyboardInterrupt("killed")
        return real_ft(cfg, *a, **k)

    monkeypatch.setattr(ft_mod, "finetune", fake_finetune)
    budget = StudyBudget(**TOY)
    with pytest.raises(KeyboardInterrupt):
        run_study(tmp_path, budget)
    runs = [e[1] for e in events if e[0] == "run"]
    assert len(runs) == 4 and all("search-" in r for r in runs[:2]) and "search-" not in runs[2]
    first_final = events.index(("run", runs[2]))
    assert not [e for e in events[:first_final] if e[0] == "test-load"]  # tuning never loaded a test record
    ledger = sorted(p.name for p in (tmp_path / "ledger").glob("*.json"))
    assert len(ledger) == 3
    for p in (tmp_path / "ledger").glob("search-*.json"):
        assert all(k.endswith("-val") for k in json.loads(p.read_text())["loss"])

    events.clear()
    kill_at["n"] = -1
    results = run_study(tmp_path, budget)
    rerun = [e[1] for e in events if e[0] == "run"]
    # 2 searches + 2 cells x 2 seeds: the killed run and the two after it; the three in the ledger are not redone
    assert len(rerun) == 3 and rerun[0].endswith("2bit-cloq-gptq-s0")
    assert results["complete"] and [c["cell"] for c in results["cells"]] == list(TOY["cells"])
    for c in results["cells"]:
        assert c["seeds"] == [0, 1] and c["acc_avg"]["half"] is not None and c["loss_avg"]["mean"] > 0
        assert set(c["accuracy"]) == set(study_mod.TEST_SETS)
    pair = next(p for p in results["pairs"] if p["a"] == "2bit-cloq-gptq")
    assert pair["b"] == "2bit-gptq-lora" and pair["loss_avg"]["seeds"] == [0, 1]
    assert pair["loss_avg"]["better"] in ("2bit-cloq-gptq", "2bit-gptq-lora", "unresolved")
    assert set(results["learning_rates"]) == {"lora-quantized"}
    md = (tmp_path / "study.md").read_text()
    assert "CLoQ (GPTQ)" in md and "±" in md
    assert (tmp_path / "study.png").read_bytes()[:4] == b"\x89PNG"
    # a third sitting trains nothing
    events.clear()
    run_study(tmp_path, budget)
    assert not [e for e in events if e[0] == "run"]


def test_ledger_entries_of_an_older_quant_config_stay_valid():
    """A ledger stamp of an older lowbit (flat settings, the options at top level) whose base settings lack a
    QuantConfig option added since (here magr_solver) still matches; a changed setting does not."""
    from lowbit.quant import QuantConfig
    from lowbit.recipes.study import _same_stamp

    new = {"recipe": "r", "overrides": ["a=1"], "model": "m",
           "base": QuantConfig(method="magr-gptq", bits=2).to_dict()}
    flat = {**{k: v for k, v in new["base"].items() if k != "options"}, **new["base"]["options"]}
    old = {**new, "base": {k: v for k, v in flat.items() if k != "magr_solver"}}
    assert "magr_iters" in old["base"] and "options" not in old["base"]
    assert _same_stamp(old, new)
    assert not _same_stamp({**old, "base": {**old["base"], "bits": 4}}, new)
    assert not _same_stamp({**old, "overrides": ["a=2"]}, new)
    assert not _same_stamp(None, new)
