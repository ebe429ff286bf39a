"""`lowbit evaluate`: the oracle on the real test files, the tiny model through the CLI, resuming, clear errors."""

import json

import pytest

from lowbit.cli import main
from lowbit.eval.config import EvalConfig
from lowbit.eval.results import read_rows
from lowbit.recipes import evaluate as run_mod
from lowbit.recipes.evaluate import EvaluateRun, run_evaluation

PAPER_SETS = ["gsm8k", "svamp", "mawps", "aqua"]


def _run(model, datasets, out=None, progress=True, overwrite=False, **protocol) -> EvaluateRun:
    return EvaluateRun(model, EvalConfig(datasets, **protocol), out=out, overwrite=overwrite, progress=progress)


def _answer_sentence(label: str) -> str:
    """What a perfect model says: a short rationale, then the label in the published answer format."""
    if label in ("A", "B", "C", "D", "E"):
        return f"Let me check each option in turn. The answer is ({label})."
    v = float(label)
    text = f"{int(v):,}" if v.is_integer() else f"{v:,}"  # thousands separators, as models write them
    return f"First, 12 + 30 = 42 and 42 / 7 = 6. So the result is {text}. The answer is {text}."


def oracle_for(records_by_set: dict[str, list[dict]], cfg: EvaluateRun):
    """A stand-in model: the label sentence of the record whose prompt it receives (duplicates in order)."""
    from lowbit.data.prompts import format_prompt

    answers: dict[str, list[str]] = {}
    for recs in records_by_set.values():
        for r in recs:
            prompt = format_prompt(r["instruction"], r.get("input", ""), cfg.eval.prompt)
            answers.setdefault(prompt, []).append(r["answer"])
    seen: dict[str, int] = {}

    def gen(prompts):
        for s in range(0, len(prompts), 64):
            idx = list(range(s, min(s + 64, len(prompts))))
            out = []
            for i in idx:
                k = seen.get(prompts[i], 0)
                seen[prompts[i]] = k + 1
                out.append(_answer_sentence(answers[prompts[i]][min(k, len(answers[prompts[i]]) - 1)]))
            yield idx, out
    return gen


def test_oracle_scores_100_on_the_real_test_files(tmp_path, real_data_dir):
    from lowbit.data.testsets import load_records, resolve_datasets

    cfg = _run("oracle", PAPER_SETS, data_dir=str(real_data_dir), out=str(tmp_path), progress=False)
    records = {s.name: load_records(s) for s in resolve_datasets(PAPER_SETS, real_data_dir)}
    summary = run_evaluation(cfg, generate_batches=oracle_for(records, cfg))
    assert {k: v["n"] for k, v in summary["datasets"].items()} == {"gsm8k": 1319, "svamp": 1000, "mawps": 238,
                                                                    "aqua": 254}
    for name, d in summary["datasets"].items():
        assert d["accuracy"] == 100.0, name
    assert summary["datasets"]["aqua"]["accuracy_by_rule"] == {"llm-adapters": 100.0, "strict": 100.0}
    assert summary["average"] == 100.0 and summary["complete"]
    rows = read_rows(tmp_path / "gsm8k.jsonl")
    assert sorted(rows) == list(range(1319)) and all(r["correct"] for r in rows.values())
    assert set(rows[0]) == {"index", "prompt", "generation", "extracted", "label", "correct"}


def _evaluate_cli(out, *extra):
    return main(["evaluate", "--model", "tiny", "--out", str(out), "--max-new-tokens", "4", *extra])


def test_tiny_model_first_20_records_through_the_cli(tmp_path, capsys, real_data_dir):
    assert _evaluate_cli(tmp_path, "--datasets", "gsm8k,svamp,mawps,aqua", "--data-dir", str(real_data_dir),
                         "--limit", "20", "--batch-size", "5") == 0
    printed = capsys.readouterr().out
    assert "GSM8K" in printed and "average" in printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [d["n"] for d in summary["datasets"].values()] == [20, 20, 20, 20]
    assert summary["generated"] == 80 and summary["complete"] and summary["bits"] == 32
    assert summary["settings"]["max_new_tokens"] == 4 and summary["settings"]["num_beams"] == 1
    for name in PAPER_SETS:
        assert len(read_rows(tmp_path / f"{name}.jsonl")) == 20


def test_progress_moves_within_a_batch(tmp_path, monkeypatch):
    """One batch of 6 examples with the tiny model: the bar moves as examples finish, before the batch ends, and
    shows the batch's generated tokens."""
    import tqdm.auto

    seen = []

    class Recording(tqdm.auto.tqdm):
        def update(self, n=1):
            seen.append(("n", self.n + n))
            return super().update(n)

        def set_postfix_str(self, s="", refresh=True):
            seen.append(("postfix", s))
            return super().set_postfix_str(s, refresh)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    summary = run_evaluation(_run("tiny", ["synthetic-gsm8k"], out=str(tmp_path), limit=6, batch_size=6,
                                  max_new_tokens=40))
    assert summary["generated"] == 6
    counts = [v for k, v in seen if k == "n"]
    assert counts[-1] == 6 and any(0 < c < 6 for c in counts), counts
    assert ("postfix", "batch 1/40 tokens") in seen


def _fake_generator(calls: list, crash_after: int | None = None):
    """Deterministic 'model' answering from the prompt; counts prompts; optionally dies after some batches."""
    def gen(prompts):
        calls.append(len(prompts))
        for b, s in enumerate(range(0, len(prompts), 3)):
            if crash_after is not None and b == crash_after:
                raise KeyboardInterrupt  # as if the job were killed mid-set
            idx = list(range(s, min(s + 3, len(prompts))))
            yield idx, [f"The answer is {len(prompts[i]) % 9}. (C)" for i in idx]
    return gen


def _sets(summary):
    return {k: (v["n"], v["correct"], v["accuracy"]) for k, v in summary["datasets"].items()}


def test_interrupted_run_resumes_with_only_the_missing_examples(tmp_path):
    sets = ["synthetic-mawps", "synthetic-aqua"]
    fresh = run_evaluation(_run("fake", sets, out=str(tmp_path / "fresh"), limit=10, progress=False),
                           _fake_generator([]))
    cfg = _run("fake", sets, out=str(tmp_path / "crash"), limit=10, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(cfg, _fake_generator([], crash_after=2))  # 6 of mawps written, then killed
    assert len(read_rows(tmp_path / "crash" / "synthetic-mawps.jsonl")) == 6
    calls = []
    resumed = run_evaluation(cfg, _fake_generator(calls))
    assert calls == [4, 10]  # only the missing mawps examples, then all of aqua
    assert _sets(resumed) == _sets(fresh) and resumed["average"] == fresh["average"]
    assert resumed["datasets"]["synthetic-mawps"]["generated"] == 4
    # A third run generates nothing and gives the same summary.
    calls = []
    again = run_evaluation(cfg, _fake_generator(calls))
    assert calls == [] and _sets(again) == _sets(fresh)
    # A larger --limit extends the sets: only the new examples are generated.
    calls = []
    run_evaluation(_run("fake", sets, out=str(tmp_path / "crash"), limit=12, progress=False),
                   _fake_generator(calls))
    assert calls == [2, 2]


def test_truncated_last_line_is_dropped_and_regenerated(tmp_path):
    cfg = _run("fake", ["synthetic-gsm8k"], out=str(tmp_path), limit=7, progress=False)
    first = run_evaluation(cfg, _fake_generator([]))
    f = tmp_path / "synthetic-gsm8k.jsonl"
    text = f.read_text()
    f.write_text(text[: len(text) - 25])  # a crash in the middle of writing the last row
    calls = []
    again = run_evaluation(cfg, _fake_generator(calls))
    assert calls == [1] and _sets(again) == _sets(first)
    assert f.read_text() == text  # rewritten whole, in index order
    f.write_text(text.replace("\n", "\n{oops\n", 1))  # damage in the middle is not silently skipped
    with pytest.raises(ValueError, match="line 2"):
        run_evaluation(cfg, _fake_generator([]))


def test_other_settings_in_out_dir_are_refused(tmp_path):
    run_evaluation(_run("fake", ["synthetic-mawps"], out=str(tmp_path), limit=3, max_new_tokens=8,
                              progress=False), _fake_generator([]))
    with pytest.raises(ValueError, match=r"max_new_tokens 8 there, 16 now.*--overwrite"):
        run_evaluation(_run("fake", ["synthetic-mawps"], out=str(tmp_path), limit=3, max_new_tokens=16,
                                  progress=False), _fake_generator([]))
    calls = []
    run_evaluation(_run("fake", ["synthetic-mawps"], out=str(tmp_path), limit=3, max_new_tokens=16,
                              overwrite=True, progress=False), _fake_generator(calls))
    assert calls == [3]
    # Another synthetic seed gives other prompts: refused rather than mixed.
    with pytest.raises(ValueError, match="another prompt"):
        run_evaluation(_run("fake", ["synthetic-mawps"], out=str(tmp_path), limit=3, max_new_tokens=16,
                                  synthetic_seed=1, progress=False), _fake_generator([]))


def test_cli_resume_with_the_tiny_model(tmp_path, monkeypatch):
    """Killed after the first batch, the rerun generates only the rest; the rows equal an uninterrupted run's."""
    import lowbit.eval.generate as gen_mod

    args = ["--datasets", "synthetic-mawps", "--limit", "5", "--batch-size", "2"]
    assert _evaluate_cli(tmp_path / "fresh", *args) == 0
    real = gen_mod.iter_generate

    def dies_after_one_batch(*a, **k):
        it = real(*a, **k)
        yield next(it)
        raise KeyboardInterrupt

    monkeypatch.setattr(gen_mod, "iter_generate", dies_after_one_batch)
    assert _evaluate_cli(tmp_path / "resumed", *args) == 130  # Ctrl-C: one line, exit status 130
    assert len(read_rows(tmp_path / "resumed" / "synthetic-mawps.jsonl")) == 2
    monkeypatch.setattr(gen_mod, "iter_generate", real)
    assert _evaluate_cli(tmp_path / "resumed", *args) == 0
    fresh = json.loads((tmp_path / "fresh" / "summary.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert resumed["generated"] == 3 and _sets(resumed) == _sets(fresh)
    assert ((tmp_path / "resumed" / "synthetic-mawps.jsonl").read_text()
            == (tmp_path / "fresh" / "synthetic-mawps.jsonl").read_text())


# ------------------------------------------------------------------------------------------- clear errors

@pytest.fixture
def no_generation(monkeypatch):
    """Fail the test if a model is loaded or anything is generated."""
    def boom(*a, **k):
        raise AssertionError("generation started")

    monkeypatch.setattr(run_mod, "load_model", boom)
    import lowbit.eval.generate as gen_mod

    monkeypatch.setattr(gen_mod, "iter_generate", boom)


def _error(capsys_or_none, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return str(e.value.code)


def test_unknown_dataset_name(tmp_path, no_generation):
    msg = _error(None, ["evaluate", "--model", "tiny", "--datasets", "gsm8k,gsm9k", "--data-dir", str(tmp_path),
                        "--out", str(tmp_path / "o")])
    assert "unknown dataset 'gsm9k'" in msg and "synthetic-gsm8k" in msg and "svamp" in msg
    assert not (tmp_path / "o").exists()


def test_missing_dataset_file(tmp_path, no_generation):
    data = tmp_path / "data"
    (data / "gsm8k").mkdir(parents=True)
    (data / "gsm8k" / "test.json").write_text(json.dumps([{"instruction": "1+1?", "input": "", "answer": "2"}]))
    msg = _error(None, ["evaluate", "--model", "tiny", "--datasets", "gsm8k,svamp", "--data-dir", str(data),
                        "--out", str(tmp_path / "o")])
    assert "'svamp'" in msg and str(data / "SVAMP" / "test.json") in msg and "--data-dir" in msg
    assert not (tmp_path / "o").exists()


def test_no_data_dir(tmp_path, monkeypatch, no_generation):
    monkeypatch.delenv("LOWBIT_DATA_DIR", raising=False)
    monkeypatch.setattr("lowbit.data.testsets.CHECKOUT_DATA_DIR", tmp_path / "no-shared-data")
    msg = _error(None, ["evaluate", "--model", "tiny", "--out", str(tmp_path / "o")])
    assert "--data-dir" in msg and "LOWBIT_DATA_DIR" in msg and "synthetic-gsm8k" in msg
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(tmp_path / "nowhere"))
    msg = _error(None, ["evaluate", "--model", "tiny", "--datasets", "mawps", "--out", str(tmp_path / "o")])
    assert "LOWBIT_DATA_DIR" in msg and "nowhere" in msg and "not a directory" in msg


def test_bad_model_and_adapter_paths(tmp_path, no_generation):
    msg = _error(None, ["evaluate", "--model", str(tmp_path / "nope"), "--datasets", "synthetic-mawps"])
    assert "no such model directory" in msg and "nope" in msg
    msg = _error(None, ["evaluate", "--model", "tiny", "--adapter", str(tmp_path / "noadapter"),
                        "--datasets", "synthetic-mawps", "--out", str(tmp_path / "o")])
    assert "noadapter" in msg and "not a directory" in msg


def test_adapter_mismatch_is_reported_before_generation(tmp_path, monkeypatch):
    """The CLI wiring, whatever lowbit.adapters does: load_adapter's ValueError becomes a clear error."""
    import lowbit.adapters
    import lowbit.eval.generate as gen_mod

    def load_adapter(model, adapter_dir, **kwargs):
        raise ValueError("adapter was trained on a 7-layer base, this model has 4 layers")

    monkeypatch.setattr(lowbit.adapters, "load_adapter", load_adapter, raising=False)
    monkeypatch.setattr(gen_mod, "iter_generate", lambda *a, **k: pytest.fail("generation started"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    msg = _error(None, ["evaluate", "--model", "tiny", "--adapter", str(adapter), "--datasets", "synthetic-mawps",
                        "--limit", "2", "--out", str(tmp_path / "o")])
    assert str(adapter) in msg and "7-layer base" in msg and "trained on" in msg
    assert not (tmp_path / "o").exists()  # nothing written: a corrected rerun starts clean


def _save_lora(model, out):
    from lowbit.adapters import AdapterConfig, apply_adapters, save_adapter

    cfg = AdapterConfig(adapter="lora", rank=2, targets=["q_proj", "v_proj"])
    apply_adapters(model, cfg, progress=False)
    return save_adapter(model, out, cfg)


def test_real_adapter_for_another_base(tmp_path, monkeypatch):
    from tiny_models import random_llama

    import lowbit.eval.generate as gen_mod

    adapter = _save_lora(random_llama(hidden=64, layers=2, intermediate=128), tmp_path / "adapter")
    monkeypatch.setattr(gen_mod, "iter_generate", lambda *a, **k: pytest.fail("generation started"))
    msg = _error(None, ["evaluate", "--model", "tiny", "--adapter", str(adapter), "--datasets", "synthetic-mawps",
                        "--limit", "2", "--out", str(tmp_path / "o")])
    assert str(adapter) in msg and "different base" in msg and "--model" in msg


def test_matching_adapter_and_quantized_base(tmp_path):
    """A lowbit-quantized directory is detected and loaded; a zero-initialised LoRA on it changes nothing."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.models.tiny import tiny_model_dir
    from lowbit.quant import QuantConfig, quantize_model
    from lowbit.quant.serialization import load_quantized, save_quantized

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32)
    cfg = QuantConfig(method="rtn", bits=4, group_size=64)
    quantize_model(model, cfg, progress=False)
    qdir = save_quantized(model, tmp_path / "q4", cfg, tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir()),
                          source=str(tiny_model_dir()))
    adapter = _save_lora(load_quantized(qdir), tmp_path / "lora")  # B = 0: the same outputs as the base
    args = ["--datasets", "synthetic-aqua", "--limit", "3"]
    assert main(["evaluate", "--model", str(qdir), "--out", str(tmp_path / "base"), "--max-new-tokens", "6",
                 *args]) == 0
    assert main(["evaluate", "--model", str(qdir), "--adapter", str(adapter), "--out", str(tmp_path / "ad"),
                 "--max-new-tokens", "6", *args]) == 0
    base = json.loads((tmp_path / "base" / "summary.json").read_text())
    with_adapter = json.loads((tmp_path / "ad" / "summary.json").read_text())
    assert base["quantized"] and base["bits"] == 4 and base["quantization"]["method"] == "rtn"
    assert with_adapter["adapter"] == str(adapter.resolve())
    gens = [[r["generation"] for r in read_rows(tmp_path / d / "synthetic-aqua.jsonl").values()]
            for d in ("base", "ad")]
    assert gens[0] == gens[1]
