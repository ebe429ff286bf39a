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
    # Missing keys and sets show "–"; bits fall back to the evaluated model's; no average over a partial row. A float
    # model evaluated without an adapter: "full precision", no trainable parameters to show.
    assert lines[4] == "| 16 | full precision | – | 10.0 | 20.0 | – | – | – | – | – | base |"


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


# --------------------------------------------------------------------- `lowbit evaluate --adapter` directories

def _evaluate(out, adapter=None):
    """A real `lowbit evaluate` summary (a stand-in generator) of ``adapter`` on 2 examples."""
    from lowbit.eval.config import EvalConfig
    from lowbit.recipes.evaluate import EvaluateRun, run_evaluation

    def gen(prompts):
        yield list(range(len(prompts))), ["The answer is 3."] * len(prompts)

    run_evaluation(EvaluateRun("base", EvalConfig(["synthetic-mawps"], limit=2), adapter=adapter and str(adapter),
                               out=str(out), progress=False), gen)
    return out


@pytest.mark.parametrize("adapter", ["lora", "diablo"])
def test_evaluated_adapter_shows_its_method_and_trainable_parameters(tmp_path, adapter):
    """No run.json or config.yaml beside the summary: the method from lowbit_adapter.json, the trainable parameters
    counted in the adapter's safetensors (equal to the model's trainable parameters)."""
    from tiny_models import random_llama

    from lowbit.adapters import AdapterConfig, apply_adapters, save_adapter
    from lowbit.adapters.model import count_parameters

    model = random_llama()
    apply_adapters(model, AdapterConfig(adapter=adapter, rank=4, num_blocks=4), progress=False)
    trainable = count_parameters(model)["trainable"]
    save_adapter(model, tmp_path / "my-adapter")
    run = load_run(_evaluate(tmp_path / "eval", tmp_path / "my-adapter"))
    assert run["method"] == f"{adapter}-default" and run["trainable_params"] == trainable > 0
    assert f"| – | {adapter}-default | {trainable / 1e3:.3g}K |" in compare_table([run])


def test_evaluated_adapter_of_a_run_takes_the_runs_keys(tmp_path):
    """An adapter in a fine-tuning run's ``adapter/``: the run's run.json beside it names the method and counts."""
    run_dir = tmp_path / "run"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"method": "GPTQ-LoRA", "trainable_params": 229376, "bits": 2,
                                                  "peak_memory_gb": 1.25, "train_time_s": 600}))
    run = load_run(_evaluate(tmp_path / "eval", run_dir / "adapter"))
    assert (run["method"], run["trainable_params"], run["peak_memory_gb"], run["train_time_s"]) == \
        ("GPTQ-LoRA", 229376, 1.25, 600)
    assert run["bits"] is None  # the evaluated model's (unknown to a stand-in generator), not the run's


def test_evaluation_without_adapter_and_gone_adapter(tmp_path, caplog):
    assert load_run(_evaluate(tmp_path / "plain"))["method"] == "full precision"
    q = _run(tmp_path / "q", {"gsm8k": 1.0}, bits=2)
    summary = json.loads((q / "summary.json").read_text())
    summary.update(quantized=True, quantization={"method": "gptq", "bits": 2}, adapter=None)
    (q / "summary.json").write_text(json.dumps(summary))
    run = load_run(q)
    assert (run["method"], run["trainable_params"]) == ("gptq, no adapter", None)
    # An adapter directory deleted since: unknown, said so.
    (tmp_path / "gone").mkdir()
    _evaluate(tmp_path / "e2", tmp_path / "gone")
    (tmp_path / "gone").rmdir()
    run = load_run(tmp_path / "e2")
    assert run["method"] is None and run["trainable_params"] is None
    assert "gone" in caplog.text
