"""`lowbit demo --quick` end to end on the embedded tiny model."""

import json

import pytest

from lowbit.cli import main


def test_demo_quick(tmp_path, capsys):
    assert main(["demo", "--quantization-only", "--quick", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| 16 | full precision |" in table and "| 2 | GPTQ | 64 |" in table and "| 4 | RTN | 64 |" in table
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(rows) == 5
    fp = rows[0]["ppl"]
    for r in rows:
        assert 0 <= r["avg_accuracy"] <= 100 and r["ppl"] > 1
    gptq4 = next(r for r in rows if r["bits"] == 4 and r["method"] == "GPTQ")
    assert gptq4["ppl"] <= 1.10 * fp
    # GPTQ's calibrated output error beats RTN's at 2 bits on the real model too.
    rtn2 = next(r for r in rows if r["bits"] == 2 and r["method"] == "RTN")
    gptq2 = next(r for r in rows if r["bits"] == 2 and r["method"] == "GPTQ")
    assert gptq2["rel_output_error"] < rtn2["rel_output_error"]


def test_demo_missing_model(tmp_path):
    with pytest.raises(SystemExit, match="has no config.json"):
        main(["demo", "--quantization-only", "--quick", "--out", str(tmp_path), "--model", str(tmp_path / "nope")])


def test_comparison_demo_quick_has_every_row_and_reuses_its_cache(tmp_path, capsys, monkeypatch):
    """`lowbit demo --quick` is the built-in spec demo-quick: every cell's row, accuracies in [0, 100], the bases
    with their held-out perplexity; a rerun reuses every run and every base."""
    from lowbit.experiments import ledger as ledger_mod
    from lowbit.experiments import load_spec

    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    spec = load_spec("demo-quick")
    assert [r["run"] for r in results["runs"]] == [c.name for c in spec.cells]
    assert len(results["runs"]) == 1 + 2 * 8  # FP LoRA + 8 methods at 4 and 2 bits
    for r in results["runs"]:
        assert r["method"] and r["bits"] in (2, 4, 16)
        for acc in r["accuracy"].values():
            assert 0 <= acc <= 100
        assert f"| {r['bits']} | {r['method']} |" in out
    fp, *quantized = results["bases"]
    assert fp["ppl"] > 1 and len(quantized) == 6 and all(b["ppl"] >= 0.99 * fp["ppl"] for b in quantized)
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"

    def refuse(*a, **k):
        raise AssertionError("the rerun redid work")

    monkeypatch.setattr(ledger_mod, "finetune", refuse)
    import lowbit.recipes.quantize as qz

    monkeypatch.setattr(qz, "run_quantize", refuse)
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0


def test_model_weights_hash_is_the_checkpoints():
    """Known value: `sha256sum lowbit/models/tiny/tiny_arith/model.safetensors` of the shipped checkpoint."""
    from lowbit.recipes.loading import model_dir_fingerprint

    assert model_dir_fingerprint("tiny")["weights"]["model.safetensors"].startswith("d154e2a950700508")
