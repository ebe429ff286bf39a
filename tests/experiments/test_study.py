"""The study's machinery at a toy budget (``study-quick``): a learning rate searched per cell with ties re-run on a
second seed, the primary contrast registered before the first final run and judged with a Holm-adjusted p, and
"before" scored both on the bare base and, for an initialised method, with its adapter as initialised."""

import json

from lowbit.experiments import load_spec, run_experiment
from lowbit.experiments.spec import Contrast


def test_study_quick_end_to_end(tmp_path):
    spec = load_spec("study-quick")  # its two 2-bit cells, two sets: the machinery, at a test's cost
    spec.cells = [c for c in spec.cells if c.name.startswith("2bit")]
    spec.contrasts = [c for c in spec.contrasts if c.primary] + [Contrast("2bit-gptq-lora", "2bit-cloq-gptq", "b − a")]
    spec.budget.eval.sets = spec.lr.search.sets = ["synthetic-gsm8k", "synthetic-mawps"]
    spec.lr.search.sets = ["synthetic-gsm8k-val", "synthetic-mawps-val"]
    out = tmp_path / "out"
    results = run_experiment(spec, out)
    assert results["complete"]
    # every cell has its own rate, and with tie=1.0 every grid value was re-run on the second seed
    assert set(results["learning_rates"]) == {c.name for c in spec.cells}
    seeds_per_rate = {}
    for r in results["search"]:
        seeds_per_rate.setdefault((r["cell"], r["lr"]), set()).add(r["seed"])
    assert seeds_per_rate and all(s == {0, 1} for s in seeds_per_rate.values())
    # the primary contrast: registered before the finals, Holm-adjusted (one contrast: adjusted p == p), one verdict
    reg = json.loads((out / "preregistration.json").read_text())
    assert [c["a"] for c in reg["contrasts"]] == ["2bit-cloq-gptq"]
    (prim,) = [c for c in results["contrasts"] if c["primary"]]
    loss = prim["response_loss"]
    assert loss["p_holm"] == loss["p"] and loss["lo"] <= loss["mean"] <= loss["hi"]
    assert loss["verdict"] in ("2bit-cloq-gptq better", "2bit-gptq-lora better", "equivalent (±0.005)",
                               "unresolved")
    assert loss["n_seeds"] == 2 and loss["n_problems"] == 8  # 2 sets x 4 problems
    (other,) = [c for c in results["contrasts"] if not c["primary"]]
    assert other["response_loss"]["verdict"] == "exploratory" and "p_holm" not in other["response_loss"]
    # before: the bare base for every run; CLoQ (an init that changes the model) also with its adapter as initialised
    runs = {r["run"]: r for r in map(json.loads, (p.read_text() for p in (out / "ledger").glob("*-s0.json")))}
    cloq, lora = runs["2bit-cloq-gptq-s0"]["before"], runs["2bit-gptq-lora-s0"]["before"]
    assert cloq["base"] == lora["base"] and cloq["loss"] == lora["loss"]  # one GPTQ base, scored once
    assert "initialised" in cloq and "initialised" not in lora
    assert cloq["initialised"]["loss"] != cloq["loss"]  # CLoQ's closed form changes the model before any step
    report = (out / "report.md").read_text()
    assert "Pre-registered contrasts" in report and "Exploratory contrasts" in report
    assert "initialised adapter" in report
