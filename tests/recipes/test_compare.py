"""`lowbit compare`: the paper-shaped markdown table and the grouped bar chart."""

import json

import pytest

from lowbit.cli import main
from lowbit.recipes.compare import compare_table, load_run


def _run(path, accs: dict, bits=None, run_json=None, config_yaml=None):
    path.mkdir(parents=True)
    sets = {k: {"name": k, "display": k, "kind": "numeric", "n": 100, "correct": int(v), "accuracy": v}
            for k, v in accs.items()}
    summary = {"model": "m", "bits": bits, "datasets": sets, "average": sum(accs.values()) / len(accs),
               "complete": True}
    (path / "summary.json").write_text(json.dumps(summary))
    if run_json is not None:
        (path / "run.json").write_text(json.dumps(run_json))
    if config_yaml is not None:
        (path / "config.yaml").write_text(config_yaml)
    return path


@pytest.fixture
def runs(tmp_path):
    a = _run(tmp_path / "qlora2", {"gsm8k": 0.9, "svamp": 1.5, "mawps": 0.8, "aqua": 5.1}, bits=2,
             run_json={"method": "QLoRA", "trainable_params": 112_000_000, "peak_memory_gb": 9.87,
                       "train_time_s": 5400})
    b = _run(tmp_path / "diablo2", {"aqua": 24.0, "gsm8k": 32.1, "svamp": 51.5, "mawps": 87.0}, bits=2,
             config_yaml="bits: 2\nmethod: DiaBlo (MagR)\ntrainable_params: 70000000\nlr: 0.0002\n",
             run_json={"train_time_s": 90})
    c = _run(tmp_path / "base", {"gsm8k": 10.0, "svamp": 20.0}, bits=16)  # evaluation only, two sets
    return [a, b, c]


def test_table_has_the_paper_shape(runs):
    table = compare_table([load_run(r) for r in runs])
    lines = table.splitlines()
    assert lines[0] == ("| bits | method | trainable | GSM8K | SVAMP | MAWPS | AQuA | avg | peak mem (GB) | "
                        "train time | run |")
    assert lines[2] == "| 2 | QLoRA | 112M | 0.9 | 1.5 | 0.8 | 5.1 | 2.1 | 9.9 | 90.0 min | qlora2 |"
    assert lines[3] == "| 2 | DiaBlo (MagR) | 70M | 32.1 | 51.5 | 87.0 | 24.0 | 48.6 | – | 90 s | diablo2 |"
    # Missing keys and sets show "–"; bits fall back to the evaluated model's; no average over a partial row.
    assert lines[4] == "| 16 | – | – | 10.0 | 20.0 | – | – | – | – | – | base |"


def test_cli_writes_table_and_png(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, runs), "--out", str(out)]) == 0
    assert "| 2 | QLoRA | 112M |" in capsys.readouterr().out
    assert (out / "compare.md").read_text().startswith("| bits | method |")
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_missing_summary_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["compare", str(tmp_path / "empty"), "--out", str(tmp_path / "cmp"), "--no-plot"])
    assert "summary.json" in str(e.value.code) and "lowbit evaluate" in str(e.value.code)


def test_compare_real_evaluate_output(tmp_path):
    """A summary written by `lowbit evaluate` (fake generator) is read by compare."""
    from lowbit.eval.config import EvalConfig
    from lowbit.recipes.evaluate import EvaluateRun, run_evaluation

    def gen(prompts):
        yield list(range(len(prompts))), ["The answer is 3."] * len(prompts)

    run_evaluation(EvaluateRun("fake", EvalConfig(["synthetic-mawps", "synthetic-aqua"], limit=4),
                               out=str(tmp_path / "r"), progress=False), gen)
    (tmp_path / "r" / "run.json").write_text(json.dumps({"bits": 4, "method": "LoRA"}))
    table = compare_table([load_run(tmp_path / "r")])
    assert "syn-MAWPS | syn-AQuA" in table and "| 4 | LoRA | – |" in table
