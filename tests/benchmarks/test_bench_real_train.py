"""Smoke test of ``benchmarks/bench_real_train.py --quick``: the real-checkpoint training benchmark's pipeline
(GSM8K batch, one NF4 base for the lowbit candidates, PEFT + bitsandbytes, DiaBlo sized to LoRA, a memory
subprocess) on the tiny model. Marked slow like the tiny-model training benchmark: it loads PEFT and bitsandbytes in
two processes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def _run_script():
    """``run_script`` of the sibling smoke-test module (tests are imported by path, not as a package)."""
    spec = importlib.util.spec_from_file_location("_bench_smoke", Path(__file__).with_name("test_bench_smoke.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.run_script


@pytest.mark.slow
def test_real_train(tmp_path):
    from lowbit.data.testsets import default_data_dir

    if default_data_dir() is None:
        pytest.skip("needs the GSM8K files: set LOWBIT_DATA_DIR")
    res = _run_script()("real_train", tmp_path)
    rows = {r["key"]: r for r in res["rows"]}
    # Without bitsandbytes (or where its 4-bit layers fail) the benchmark says so and still runs part 2.
    if importlib.util.find_spec("bitsandbytes") is None or importlib.util.find_spec("peft") is None:
        assert not res["bitsandbytes_ok"]
    assert ("NOT run" in res["bitsandbytes"]) is (not res["bitsandbytes_ok"])
    assert {"lowbit-lora", "lowbit-diablo"} <= set(rows)
    for r in rows.values():
        assert r["median_s"] > 0 and r["spread_s"] >= 0 and r["base_bytes"] > r["linear4bit_bytes"] > 0
    match = res["diablo_match"]
    assert rows["lowbit-diablo"]["trainable_params"] == match["diablo_params"]
    assert rows["lowbit-lora"]["trainable_params"] == match["lora_params"]
    assert abs(match["relative_difference"]) <= 0.02
    # Zero-initialised adapters: the first loss is the quantized base's, close to the float model's.
    assert rows["lowbit-lora"]["initial_loss"] == pytest.approx(rows["lowbit-diablo"]["initial_loss"], abs=1e-4)
    assert rows["lowbit-lora"]["initial_loss"] == pytest.approx(res["float_loss"], abs=0.5)
    measured = [r for r in rows.values() if r["peak_rise_bytes"] is not None]
    assert len(measured) == 1 and measured[0]["peak_rise_bytes"] > 0
    assert all(r["memory_error"] is None for r in rows.values())
    if res["bitsandbytes_ok"]:
        bnb = rows["peft-bnb"]
        assert bnb["trainable_params"] == rows["lowbit-lora"]["trainable_params"]
        # Both NF4 in blocks of 64: the initial losses differ by rounding only, the 4-bit linears by < 10 %.
        assert bnb["initial_loss"] == pytest.approx(rows["lowbit-lora"]["initial_loss"], abs=0.1)
        assert bnb["linear4bit_bytes"] == pytest.approx(rows["lowbit-lora"]["linear4bit_bytes"], rel=0.1)
