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


def test_comparison_demo_quick_has_every_row_and_reuses_its_cache(tmp_path, capsys):
    """The quick comparison (92 s on 2 idle cores): every row, accuracies in [0, 100], a rerun reuses the cache."""
    from lowbit.recipes.demo import QUICK_METHODS, demo_runs

    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    names = [r["name"] for r in results["runs"]]
    assert names == [name for name, *_ in demo_runs(quick=True)]
    assert len(names) == 1 + 2 * len(QUICK_METHODS)
    for r in results["runs"]:
        assert r["method"] and r["bits"] in (2, 4, 16)
        for acc in r["accuracy"].values():
            assert 0 <= acc <= 100
        assert f"| {r['bits']} | {r['method']} |" in out
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    # a rerun trains nothing
    mtimes = {p: p.stat().st_mtime for p in tmp_path.glob("runs/*/run.json")}
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    assert {p: p.stat().st_mtime for p in tmp_path.glob("runs/*/run.json")} == mtimes


def test_base_cache_is_rebuilt_for_another_tiny_checkpoint(tmp_path, monkeypatch):
    """The bases and their perplexities are keyed by the tiny model's weights: another checkpoint starts afresh."""
    import lowbit.recipes.demo as demo
    from lowbit.io import SEAL, atomic_write_json

    monkeypatch.setattr(demo, "model_fingerprint", lambda: "old")
    cache = tmp_path / "bases" / "perplexity.json"
    demo.build_bases(tmp_path, [])
    stored = json.loads(cache.read_text())
    assert stored["source"] == "old" and stored["fp"] > 1
    # A stale value, sealed as lowbit seals it (an unsealed edit is a corrupt entry, recomputed: tests/reliability).
    atomic_write_json(cache, {k: v for k, v in {**stored, "fp": 123.0}.items() if k != SEAL}, seal=True)
    demo.build_bases(tmp_path, [])
    assert json.loads(cache.read_text())["fp"] == 123.0  # same checkpoint: reused
    monkeypatch.setattr(demo, "model_fingerprint", lambda: "new")
    rows = demo.build_bases(tmp_path, [])
    stored = json.loads(cache.read_text())
    assert stored["source"] == "new" and stored["fp"] != 123.0 and rows[0]["ppl"] == stored["fp"]


def test_model_fingerprint_is_the_weights_hash():
    """Known value: `sha256sum lowbit/models/tiny/tiny_arith/model.safetensors` of the shipped checkpoint."""
    from lowbit.recipes.demo import model_fingerprint

    assert model_fingerprint() == "d154e2a950700508"
