"""Smoke tests of the benchmark scripts: each runs end to end with ``--quick`` into a temporary directory and
writes its JSON (machine, torch, threads, load average, medians and spreads) and markdown table.

The scripts run as subprocesses exactly as ``make bench`` runs them (``python benchmarks/<script>.py``), on one
thread so that other jobs on a small shared machine cannot stall them. The fast ones together take well under a
minute on a 2-core CPU, the scale benchmark's quick run (eleven subprocesses) about one more; the tiny-model
training benchmark (one subprocess per configuration), GPTQModel's quantizer and the GPTQ export round trip
(GPTQModel is a slow import) are marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"


def run_script(name: str, out_dir: Path, *extra: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GPTQMODEL_CPU_WORKERS": "2",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(BENCH / f"bench_{name}.py"), "--quick", "--threads", "1", "--out-dir", str(out_dir),
           *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, check=False)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    result = json.loads((out_dir / f"{name}.json").read_text())
    md = (out_dir / f"{name}.md").read_text()
    assert md.startswith("### ") and "|---" in md and md in proc.stdout + "\n"
    m = result["machine"]
    assert m["torch"] == torch.__version__ and m["threads"] == 1
    assert len(m["loadavg_start"]) == 3 and len(m["loadavg_end"]) == 3
    assert "avx512_bf16" in m["isa"]
    return result


def _timed_rows(rows: list[dict]) -> None:
    assert rows
    for r in rows:
        assert r["median_s"] > 0 and r["spread_s"] >= 0


def test_adapters(tmp_path):
    res = run_script("adapters", tmp_path)
    _timed_rows(res["rows"])
    by = {r["candidate"]: r for r in res["rows"]}
    assert set(by) >= {"base only", "LoRA", "DiaBlo", "DiaBlo einsum (reference)"}
    # Equal trainable parameters to within one LoRA rank step.
    lora, dia = by["LoRA"], by["DiaBlo"]
    inp, out = lora["shape_in_out"]
    assert abs(lora["trainable_params"] - dia["trainable_params"]) <= (inp + out) / 2
    assert by["DiaBlo"]["saved_for_backward_bytes"] > 0
    assert res["diablo_over_lora"]
    _check_verdicts(res)


def test_qwha(tmp_path):
    res = run_script("qwha", tmp_path)
    _timed_rows(res["rows"])
    by = {r["candidate"]: r for r in res["rows"]}
    assert set(by) >= {"base only", "LoRA", "QWHA", "QWHA dense ΔW (released code's forward)"}
    assert by["QWHA"]["trainable_params"] == by["LoRA"]["trainable_params"] > 0  # exactly LoRA's count
    assert by["QWHA"]["saved_for_backward_bytes"] > 0 and res["qwha_over_lora"] > 0
    _check_verdicts(res)


def test_quantlinear(tmp_path):
    res = run_script("quantlinear", tmp_path)
    _timed_rows(res["rows"])
    by = {r["layer"]: r for r in res["rows"]}
    for bits in (8, 4, 3, 2):
        for g in (128, 64):
            r = by[f"QuantLinear {bits}-bit g{g}"]
            # in_features is a multiple of 32 here: storage is exactly bits + 32/g (fp16 scale + zero per group).
            assert r["bits_per_weight"] == pytest.approx(bits + 32 / g)
    assert "nn.Linear bf16" in by and "QuantLinear 4-bit g128 (bf16 compute)" in by
    assert res["act_order_bits_per_weight"]["4-bit g128 act-order"] == pytest.approx(4.25 + 32 / res["shape"][0])
    assert all(r["effective_gbs"] > 0 for r in res["dequantize"])
    assert res["bitsandbytes"]  # a version or the reason it could not run
    assert res["headline"]["4bit_g128_vs_fp32_linear"] > 0
    _check_verdicts(res)


def test_quantize_lowbit(tmp_path):
    res = run_script("quantize", tmp_path, "--no-gptqmodel")
    _timed_rows(res["rows"])
    errs = {r["method"].split(" ")[0]: r["rel_output_error"] for r in res["rows"] if r["rel_output_error"]}
    assert errs["GPTQ"] < errs["RTN"]  # the calibrated quantizer wins on the calibrated objective


def test_real_quantize_lowbit(tmp_path):
    """The real-checkpoint benchmark's pipeline (GSM8K calibration and held-out text, lowbit candidates) on the
    tiny model; the SmolLM2 run itself takes an hour on 2 cores."""
    from lowbit.data.testsets import default_data_dir

    if default_data_dir() is None:
        pytest.skip("needs the GSM8K files: set LOWBIT_DATA_DIR")
    res = run_script("real_quantize", tmp_path, "--no-gptqmodel")
    names = [r["candidate"] for r in res["records"]]
    assert "lowbit GPTQ (default: act-order + static groups)" in names and "lowbit GPTQ, reordering off" in names
    assert "lowbit NF" in names
    assert all(r["ppl"] > 1 and r["time_s"]["median_s"] > 0 for r in res["records"])


@pytest.mark.slow
def test_quantize_with_gptqmodel(tmp_path):
    if importlib.util.find_spec("gptqmodel") is None:
        pytest.skip("gptqmodel not installed")
    res = run_script("quantize", tmp_path)
    gptq = [r for r in res["rows"] if r["method"].startswith("GPTQ")]
    assert len(gptq) == 2
    # Same algorithm, same inputs: the two implementations reach the same output error.
    assert gptq[0]["rel_output_error"] == pytest.approx(gptq[1]["rel_output_error"], rel=0.05)
    assert list(res["headline"].values())[0] > 0
    _check_verdicts(res)


@pytest.mark.slow
def test_real_export(tmp_path):
    """The real-checkpoint export benchmark on the tiny model: lowbit's GPTQ export loads back in GPTQModel and in
    transformers with identical weights and the same perplexity (~20 s; the SmolLM2 run takes far longer)."""
    from lowbit.data.testsets import default_data_dir

    if importlib.util.find_spec("gptqmodel") is None or importlib.util.find_spec("optimum") is None:
        pytest.skip("gptqmodel and optimum not installed")
    if default_data_dir() is None:
        pytest.skip("needs the GSM8K files: set LOWBIT_DATA_DIR")
    res = run_script("real_export", tmp_path, "--transformers-torch-kernel")
    (rec,) = res["records"]
    assert rec["bits"] == 4 and rec["exported_quantize_config"]["checkpoint_format"] == "gptq_v2"  # asymmetric
    loaded = {s["scorer"]: s for s in rec["scores"] if s["scorer"] != "lowbit"}
    assert {"GPTQModel", "transformers"} <= set(loaded)
    if loaded["transformers"]["kernels"] != ["TorchLinear"]:  # its own CPU kernel: rescored with GPTQModel's
        assert "transformers, backend=torch" in loaded
    for s in loaded.values():
        assert s["max_abs_weight_diff"] == 0 and s["within_tolerance"], s
    assert rec["all_within_tolerance"]


def test_init(tmp_path):
    res = run_script("init", tmp_path)
    by = {r["method"].split(" (")[0]: r for r in res["rows"]}
    assert set(by) == {"CLoQ", "calibrated DiaBlo", "LoftQ 1 iteration", "LoftQ 5 iterations"}
    assert all(r["seconds"] > 0 for r in res["rows"])
    assert by["CLoQ"]["objective"] < 1 and by["calibrated DiaBlo"]["objective"] < 1  # both reduce the error


def test_generate(tmp_path):
    res = run_script("generate", tmp_path)
    _timed_rows(res["rows"])
    assert res["identical_outputs"] is True
    _check_verdicts(res)


@pytest.mark.slow
def test_train_tiny(tmp_path):
    res = run_script("train_tiny", tmp_path)
    _timed_rows(res["rows"])
    assert all(r["memory_error"] is None and r["peak_rss_bytes"] for r in res["rows"])
    # each configuration's own peak (a child inheriting its parent's ru_maxrss reported one value for all)
    assert len({r["peak_rss_bytes"] for r in res["rows"]}) == len(res["rows"])
    by = {r["config"]: r for r in res["rows"]}
    assert by["2-bit diablo"]["base_bytes"] < by["fp32 lora"]["base_bytes"] / 4
    _check_verdicts(res)


def test_magr(tmp_path):
    """FISTA reaches plain MagR's 200-iteration objective (within 0.1%) in fewer iterations; the ratio comes with
    its bootstrap interval and a verdict computed from that interval."""
    res = run_script("magr", tmp_path)
    (row,) = res["rows"]
    assert row["fista_objective"] <= 1.001 * row["plain_objective"] and row["fista_iters"] < 200
    lo, hi = row["ci95"]
    assert lo <= row["ratio"] <= hi and row["repeats"] == len(row["ratios"]) >= 2
    assert row["verdict"] == ("met" if hi <= 0.25 else "missed" if lo > 0.25 else "unresolved")
    _check_verdicts(res)


def test_scale(tmp_path):
    """The scale benchmark's pipeline at width 256, one layer (about a minute): the checkpoint is generated, then
    quantized (GPTQ, MagR+GPTQ), given CLoQ and calibrated DiaBlo adapters and trained one step, each phase in its
    own process with a measured peak and a predicted one (no timing assertions)."""
    res = run_script("scale", tmp_path)
    rows = res["rows"]
    assert [r["phase"] for r in rows] == ["generate"] + ["quantize"] * 2 + ["init"] * 2 + ["train"] * 4
    for r in rows:
        assert r["error"] is None, r
        assert r["peak_rss_bytes"] > 0 and r["predicted"]["total_bytes"] > 0 and r["layers"] == 1
    assert res["baseline"]["peak_rss_bytes"] > 0 and res["imports"]["peak_rss_bytes"] > 0
    assert all(f["model_32_gib"] > 0 and f["fit_32_gib"] is None for f in res["fits"])  # one layer count: no fit
    assert {(d["layers"], d["batch"]) for d in res["diablo_over_lora"]} == {(1, 1), (1, 4)}


def test_scale_memory_model():
    """The analytical model counts the DiaBlo paper's trainable parameters of LLaMA-2-7B (q, k, v, up, down) and
    grows linearly in the layers where the packed base does; the line fit recovers a line."""
    sys.path.insert(0, str(BENCH))
    import _scale_memory as mm
    from bench_scale import line_fit

    from lowbit.models.random_llama import LlamaShape

    targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert mm.adapter_params(LlamaShape(), "diablo", targets, num_blocks=64) == 70_254_592
    assert mm.adapter_params(LlamaShape(), "lora", targets, rank=64) == 112_197_632
    kw = dict(adapter="diablo", targets=targets, batch=1, seqlen=512, bits=2, group=64)
    p = [mm.predict_train(LlamaShape(layers=n), 0, **kw)["total_bytes"] for n in (2, 4, 8)]
    assert p[0] < p[1] < p[2] and abs((p[2] - p[1]) - 2 * (p[1] - p[0])) < 1e-6 * p[2]
    streamed = mm.predict_quantize(LlamaShape(), 0, method="gptq", bits=2, group=64, nsamples=16, seqlen=512,
                                   stream=True)
    whole = mm.predict_quantize(LlamaShape(), 0, method="gptq", bits=2, group=64, nsamples=16, seqlen=512)
    assert streamed["total_bytes"] < whole["total_bytes"] / 2 and whole["peak_stage"] == "load"
    assert line_fit([2, 4, 8], [3.0, 5.0, 9.0]) == (1.0, 1.0) and line_fit([2, 2], [1.0, 2.0]) is None


def test_paired_ratio_interval_and_verdicts():
    """The bootstrap interval of the median ratio covers the true ratio of two known workloads; verdicts follow
    the interval only."""
    import sys

    sys.path.insert(0, str(BENCH))
    from _common import bootstrap_median_ci, ratio_verdict

    med, lo, hi = bootstrap_median_ci([1.0] * 9)
    assert med == lo == hi == 1.0
    med, lo, hi = bootstrap_median_ci([0.9, 1.0, 1.1, 1.0, 0.95, 1.05, 1.0])
    assert lo <= med <= hi and 0.9 <= lo and hi <= 1.1
    assert ratio_verdict(0.8, 0.95, 1.0) == "met" and ratio_verdict(1.02, 1.2, 1.0) == "missed"
    assert ratio_verdict(0.9, 1.1, 1.0) == "unresolved" and ratio_verdict(0.9, 1.1, None) == "report"
    assert ratio_verdict(1.1, 1.3, 1.0, higher_is_better=True) == "met"


def test_gpu_check_dry_run(tmp_path):
    """`scripts/gpu_check.sh --dry-run`: the GPU check's code path at toy sizes on this machine's device."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["dry_run"] and {r["item"] for r in res["rows"]} == {"quantlinear", "adapters", "memory"}
    for r in res["rows"]:
        if r["item"] != "memory":
            assert r["ci95"][0] <= r["ratio"] <= r["ci95"][1] and r["verdict"] in ("met", "missed", "unresolved",
                                                                                   "report")
        else:
            assert r["tokens_per_s"] > 0 and r["trainable"] > 0
    ada = [r for r in res["rows"] if r["item"] == "adapters"]
    square = [r["params_diablo_lora"] for r in ada if r["shape"][0] == r["shape"][1]]
    assert square and all(abs(a - b) <= 0.02 * a for a, b in square)
    assert "gpu check done" in proc.stdout


def _check_verdicts(res: dict) -> None:
    """Every verdict row a script writes for the README table: interval around the median, verdict from it."""
    sys.path.insert(0, str(BENCH))
    from _common import ratio_verdict

    assert res["verdicts"]
    for v in res["verdicts"]:
        lo, hi = v["ci95"]
        assert lo <= v["ratio"] <= hi and v["repeats"] >= 2 and v["what"]
        target = float(v["target"].removeprefix("≤ ")) if v["target"] else None
        assert v["verdict"] == ratio_verdict(lo, hi, target), v


def test_readme_benchmark_table_is_generated():
    """The benchmark table of the README and of docs/RESULTS.md is exactly what `benchmarks/summarize.py` builds
    from the committed results, and every line's verdict follows from its interval and target (nothing typed by
    hand)."""
    sys.path.insert(0, str(BENCH))
    import summarize
    from _common import ratio_verdict

    rows = summarize.collect(BENCH / "results")
    for doc in summarize.DOCS:
        text = (ROOT / doc).read_text()
        assert summarize.splice(text, summarize.render(rows)) == text, f"{doc}: run python benchmarks/summarize.py"
    for v in rows:
        lo, hi = v["ci95"]
        target = float(v["target"].removeprefix("≤ ")) if v["target"] else None
        assert lo <= v["ratio"] <= hi and v["verdict"] == ratio_verdict(lo, hi, target), v


def test_summarize_splices_between_markers():
    sys.path.insert(0, str(BENCH))
    import summarize

    row = {"source": "x.json", "what": "a / b", "ratio": 0.9, "ci95": [0.85, 0.95], "repeats": 5, "target": "≤ 1",
           "verdict": "met"}
    text = f"intro\n{summarize.START}\nold\n{summarize.END}\noutro\n"
    out = summarize.splice(text, summarize.render([row]))
    assert out.startswith("intro\n") and out.endswith("outro\n") and "old" not in out
    assert "| `x.json` | a / b | 0.900 | [0.850, 0.950] | 5 | ≤ 1 | met |" in out
    with pytest.raises(SystemExit, match="markers"):
        summarize.splice("no markers", "t")
