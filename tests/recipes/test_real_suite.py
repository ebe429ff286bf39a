"""The SmolLM2 recipe suite (`lowbit demo --real`): its recipes, and the driver end to end on the tiny recipes."""

import json

from lowbit.recipes.config import load_recipe
from lowbit.recipes.real_suite import METHODS, OWN_BASE, SuiteBudget, format_table, run_suite, suite_runs


def test_every_suite_recipe_exists_and_names_smollm2():
    for _name, key, bits in suite_runs(quick=False):
        recipe = f"smollm2-{key}" if bits is None else f"smollm2-{key}-{bits}bit"
        cfg = load_recipe(recipe)
        assert cfg.model.name == "smollm2-135m", recipe
        assert cfg.eval is not None and cfg.eval.response_loss and set(cfg.eval.datasets) == {
            "gsm8k", "svamp", "mawps", "aqua"}
        assert (cfg.quant is None) == (bits is None) and (bits is None or cfg.quant.bits == bits)
        assert cfg.calibration.sources == ["data:gsm8k_openai/train.jsonl"]
    names = [n for n, *_ in suite_runs(quick=False)]
    assert len(names) == len(set(names)) == 2 + 3 + 7
    assert OWN_BASE <= set(METHODS)


def test_quick_suite_before_after_and_cache(tmp_path, capsys, monkeypatch):
    """Two tiny recipes, 2 steps each: every row has a response loss before and after on every set; a rerun
    trains and evaluates nothing again."""
    budget = SuiteBudget(steps=2, eval_limit=2, loss_limit=3, max_new_tokens=8, calib_samples=4, magr_iters=3)
    res = run_suite(tmp_path, quick=True, budget=budget, prefix="tiny")
    rows = res["rows"]
    assert [r["run"] for r in rows] == [n for n, *_ in suite_runs(quick=True)]
    for r in rows:
        assert r["before"].keys() == r["after"].keys() and len(r["after"]) == 4
        for s in r["after"]:
            assert r["before"][s]["loss"] > 0 and r["after"][s]["loss"] > 0
            assert 0 <= r["after"][s]["acc"] <= 100
    # GPTQ-LoRA and DiaBlo (MagR) are on different bases, each built once.
    assert {r["base"] for r in rows} == {"gptq-2bit", "magr-gptq-2bit"}
    assert sorted(p.name for p in (tmp_path / "bases").iterdir()) == ["gptq-2bit", "magr-gptq-2bit"]
    out = capsys.readouterr().out
    assert "→" in out and "loss lower on all" in out
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    # A rerun loads no model: no quantization, no training, no generation or loss scoring.
    import lowbit.recipes.evaluate as ev
    import lowbit.recipes.finetune as ft
    import lowbit.recipes.quantize as qz

    def refuse(*a, **k):
        raise AssertionError("the rerun redid work")

    monkeypatch.setattr(ft, "finetune", refuse)
    monkeypatch.setattr(qz, "run_quantize", refuse)
    monkeypatch.setattr(ev, "load_model", refuse)
    again = run_suite(tmp_path, quick=True, budget=budget, prefix="tiny")
    assert again["rows"] == json.loads((tmp_path / "results.json").read_text())["rows"] == rows


def test_table_says_whether_the_loss_fell_everywhere():
    row = {"run": "x", "method": "M", "bits": 2, "trainable_params": 10, "train_time_s": 1.0,
           "before": {"a": {"loss": 2.0, "acc": 0.0}, "b": {"loss": 1.0, "acc": 5.0}},
           "after": {"a": {"loss": 1.5, "acc": 10.0}, "b": {"loss": 1.2, "acc": 5.0}}}
    assert format_table([row]).splitlines()[-1].endswith("| no |")
    row["after"]["b"]["loss"] = 0.9
    assert format_table([row]).splitlines()[-1].endswith("| yes |")
