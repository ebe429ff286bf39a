"""Bad input to the quantization and adapter layers fails loudly, naming what is wrong and how to fix it: an
adapter on another base, NaN calibration activations, corrupt or truncated files, a directory swap cut by a crash,
and quantization settings an initialisation would ignore."""

import copy
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import random_llama

import lowbit.io
from lowbit.adapters import (
    AdapterConfig,
    adapter_modules,
    apply_adapters,
    load_adapter,
    save_adapter,
    set_adapter_weights,
    without_adapters,
)
from lowbit.quant import QuantConfig, load_quantized, quantize_model, save_quantized

ROOT = Path(__file__).resolve().parents[2]
# Registers a test's expected errors for docs/BAD_INPUTS.md (tests/reliability/conftest.py).
bad_input = pytest.mark.bad_input


@pytest.fixture(scope="module")
def fp_model():
    return random_llama(hidden=64, layers=2, heads=4, intermediate=128, vocab_size=320, seed=0)


@pytest.fixture(scope="module")
def calib():
    return torch.randint(3, 320, (8, 32), generator=torch.Generator().manual_seed(0))


def _quantized(fp_model, quant, calib=None):
    m = copy.deepcopy(fp_model)
    quantize_model(m, quant, calib, progress=False)
    return m


GPTQ2 = QuantConfig(method="gptq", bits=2, group_size=32)


@pytest.fixture(scope="module")
def cloq_dir(fp_model, calib, tmp_path_factory):
    """A CLoQ adapter trained (here: initialised) on a 2-bit GPTQ base, and that base saved."""
    d = tmp_path_factory.mktemp("cloq")
    m = copy.deepcopy(fp_model)
    apply_adapters(m, AdapterConfig(init="cloq", rank=4, targets=["q_proj", "v_proj"]), calib, quant=GPTQ2,
                   progress=False)
    save_adapter(m, d / "adapter", extra={"base": str(d / "base")})
    with without_adapters(m) as base:
        save_quantized(base, d / "base", GPTQ2)
    return d


# ---------------------------------------------------------------------------------------------- adapter on its base

@bad_input("an adapter of a 2-bit base loaded on the float model / a 4-bit base")
def test_adapter_of_a_2bit_base_is_refused_by_the_float_model_and_a_4bit_base(fp_model, cloq_dir):
    float_model = copy.deepcopy(fp_model)
    with pytest.raises(ValueError, match=r"trained on a 2-bit gptq \(group 32\) base, this model is float.*"
                                         r"base it was trained on.*force=True"):
        load_adapter(float_model, cloq_dir / "adapter")
    assert not adapter_modules(float_model)  # refused before anything was attached
    four = _quantized(fp_model, QuantConfig(method="rtn", bits=4, group_size=32))
    with pytest.raises(ValueError, match=r"trained on a 2-bit gptq \(group 32\) base, this model is a 4-bit rtn"):
        load_adapter(four, cloq_dir / "adapter")
    assert not adapter_modules(four)


def test_adapter_loads_on_its_saved_base_and_force_overrides(fp_model, cloq_dir, caplog):
    m = load_adapter(load_quantized(cloq_dir / "base"), cloq_dir / "adapter")
    assert len(adapter_modules(m)) == 4
    with caplog.at_level(logging.WARNING, logger="lowbit.adapters.storage"):
        forced = load_adapter(copy.deepcopy(fp_model), cloq_dir / "adapter", force=True)
    assert len(adapter_modules(forced)) == 4
    assert "this model is float" in caplog.text and "force=True" in caplog.text


@bad_input("an adapter loaded on another quantization run with the same settings")
def test_another_quantization_run_with_the_same_settings_is_refused(fp_model, cloq_dir, calib):
    other_calib = torch.randint(3, 320, (8, 32), generator=torch.Generator().manual_seed(1))
    other = _quantized(fp_model, GPTQ2, other_calib)
    with pytest.raises(ValueError, match="quantized weights differ"):
        load_adapter(other, cloq_dir / "adapter")


@bad_input("a LoftQ adapter loaded on a plain RTN base")
def test_loftq_adapter_needs_its_requantized_base(fp_model, tmp_path):
    # LoftQ re-quantizes the base: the fingerprint is taken from the base as trained, so the saved base loads it
    # and a plain RTN base of the same settings does not.
    quant = QuantConfig(method="rtn", bits=2, group_size=32)
    m = copy.deepcopy(fp_model)
    apply_adapters(m, AdapterConfig(init="loftq", rank=4, targets=["q_proj"], init_options={"loftq_iters": 2}),
                   quant=quant, progress=False)
    save_adapter(m, tmp_path / "ad")
    with without_adapters(m) as base:
        save_quantized(base, tmp_path / "base", quant)
    load_adapter(load_quantized(tmp_path / "base"), tmp_path / "ad")
    with pytest.raises(ValueError, match="quantized weights differ"):
        load_adapter(_quantized(fp_model, quant), tmp_path / "ad")


@bad_input("an adapter loaded on another float model")
def test_float_base_is_recognised_in_another_dtype_and_another_float_model_is_refused(fp_model, tmp_path):
    m = copy.deepcopy(fp_model)
    apply_adapters(m, AdapterConfig(rank=4, targets=["q_proj"]), progress=False)
    save_adapter(m, tmp_path / "ad")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        load_adapter(copy.deepcopy(fp_model).to(dtype), tmp_path / "ad")
    other = random_llama(hidden=64, layers=2, heads=4, intermediate=128, vocab_size=320, seed=1)
    with pytest.raises(ValueError, match="weights differ from the adapter's base"):
        load_adapter(other, tmp_path / "ad")


def test_adapter_without_fingerprint_loads_with_a_warning(fp_model, tmp_path, caplog):
    m = copy.deepcopy(fp_model)
    apply_adapters(m, AdapterConfig(rank=4, targets=["q_proj"]), progress=False)
    save_adapter(m, tmp_path / "ad")
    meta_path = tmp_path / "ad" / "lowbit_adapter.json"
    meta = json.loads(meta_path.read_text())
    assert meta["base_fingerprint"]["quantized"] is False
    del meta["base_fingerprint"]  # as written before fingerprints existed (nor checksums: no seal, no manifest)
    del meta["content_sha256"], meta["files"]
    meta_path.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="lowbit.adapters.storage"):
        load_adapter(copy.deepcopy(fp_model), tmp_path / "ad")
    assert "no base fingerprint" in caplog.text
    caplog.clear()
    meta_path.unlink()  # a PEFT directory: adapter_config.json + weights only
    with caplog.at_level(logging.WARNING, logger="lowbit.adapters.storage"):
        loaded = load_adapter(copy.deepcopy(fp_model), tmp_path / "ad")
    assert len(adapter_modules(loaded)) == 2 and "no base fingerprint" in caplog.text


# ---------------------------------------------------------------------------------------------- NaN activations

@bad_input("MagR with a NaN in H")
def test_magr_blames_non_finite_calibration_activations():
    from lowbit.quant.magr import magr

    W = torch.randn(8, 16)
    H = torch.eye(16)
    H[3, 3] = float("nan")
    with pytest.raises(ValueError, match="calibration activations are non-finite"):
        magr(W, H, iters=2)


@bad_input("quantize_model ({method}) with NaN calibration activations")
@pytest.mark.parametrize("method", ["magr-gptq", "gptq"])
def test_quantize_model_names_the_layer_with_nan_activations(fp_model, calib, method):
    m = copy.deepcopy(fp_model)
    with torch.no_grad():
        m.model.embed_tokens.weight[calib[0, 0]] = float("nan")  # finite linears, NaN activations
    with pytest.raises(ValueError, match=r"layer 0 self_attn\.q_proj: the calibration activations reaching it are "
                                         r"non-finite") as e:
        options = {"magr_iters": 2} if method == "magr-gptq" else {}
        quantize_model(m, QuantConfig(method=method, bits=2, group_size=32, options=options), calib, progress=False)
    assert "checkpoint" not in str(e.value)


@bad_input("a quantizer that raises")
def test_quantizer_errors_name_the_layer(fp_model, calib, monkeypatch):
    from lowbit.quant.config import QUANTIZERS, Quantizer

    def fail(W, H, cfg):
        raise ValueError("H is not positive definite")

    monkeypatch.setitem(QUANTIZERS, "failing", Quantizer("failing", fail, needs_calibration=True))
    with pytest.raises(ValueError, match=r"layer 0 self_attn\.q_proj: H is not positive definite"):
        quantize_model(copy.deepcopy(fp_model), QuantConfig(method="failing", bits=2), calib, progress=False)


# ---------------------------------------------------------------------------------------------- corrupt files

@pytest.fixture()
def qdir(fp_model, tmp_path):
    quant = QuantConfig(method="rtn", bits=2, group_size=32)
    return save_quantized(_quantized(fp_model, quant), tmp_path / "q", quant)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@bad_input("a quantized model's model.safetensors truncated")
def test_truncated_quantized_weights_are_named(qdir):
    _truncate(qdir / "model.safetensors")
    with pytest.raises(ValueError, match=r"q/model\.safetensors is truncated or corrupt.*re-create it.*lowbit "
                                         r"quantize"):
        load_quantized(qdir)


@bad_input("quant_config.json truncated")
def test_corrupt_quantized_configs_are_named(qdir):
    _truncate(qdir / "quant_config.json")
    with pytest.raises(ValueError, match=r"quant_config\.json is truncated or corrupt"):
        load_quantized(qdir)


@bad_input("a quantized model's config.json truncated")
def test_corrupt_hf_config_is_named(qdir):
    _truncate(qdir / "config.json")
    with pytest.raises(ValueError, match=r"q/config\.json is truncated or corrupt"):
        load_quantized(qdir)


@bad_input("an Inf among stored scales")
def test_non_finite_stored_scales_are_refused_on_load(qdir):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(qdir / "model.safetensors"))
    key = "model.layers.1.mlp.up_proj.scales"
    sd[key][0, 0] = float("inf")
    save_file(sd, str(qdir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"model\.safetensors: tensor {key} holds 1 NaN/Inf"):
        load_quantized(qdir)


@bad_input("model.safetensors lacking a tensor that quant_config.json lists")
def test_weights_not_matching_the_config_are_named(qdir):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(qdir / "model.safetensors"))
    del sd["model.layers.0.self_attn.q_proj.zeros"]
    save_file(sd, str(qdir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors does not match .*quant_config\.json"):
        load_quantized(qdir)


@bad_input("adapter_model.safetensors / lowbit_adapter.json truncated")
def test_corrupt_adapter_files_are_named(fp_model, tmp_path):
    m = copy.deepcopy(fp_model)
    apply_adapters(m, AdapterConfig(rank=4, targets=["q_proj"]), progress=False)
    save_adapter(m, tmp_path / "ad")
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    good = weights.read_bytes()
    _truncate(weights)
    with pytest.raises(ValueError, match=r"ad/adapter_model\.safetensors is truncated or corrupt"):
        load_adapter(copy.deepcopy(fp_model), tmp_path / "ad")
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is truncated or corrupt"):
        set_adapter_weights(m, tmp_path / "ad")
    weights.write_bytes(good)
    _truncate(tmp_path / "ad" / "lowbit_adapter.json")
    with pytest.raises(ValueError, match=r"lowbit_adapter\.json is truncated or corrupt"):
        load_adapter(copy.deepcopy(fp_model), tmp_path / "ad")


@bad_input("load_safetensors of a missing / one-byte file")
def test_load_safetensors_helper(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist"):
        lowbit.io.load_safetensors(tmp_path / "missing.safetensors")
    save_file({"a": torch.arange(6.0).reshape(2, 3)}, str(tmp_path / "t.safetensors"))
    assert torch.equal(lowbit.io.load_safetensors(tmp_path / "t.safetensors")["a"], torch.arange(6.0).reshape(2, 3))
    (tmp_path / "bad.safetensors").write_bytes(b"\x05")
    with pytest.raises(ValueError, match="bad.safetensors is truncated or corrupt"):
        lowbit.io.load_safetensors(tmp_path / "bad.safetensors")


# ---------------------------------------------------------------------------------------------- directory swaps

_CRASH_SCRIPT = textwrap.dedent("""
    import os, shutil, sys
    from pathlib import Path
    import lowbit.io as lio

    target, crash_at, exchange = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    if not exchange:
        lio.exchange_paths = lambda a, b: False
    calls = [0]

    def step(real):
        def f(*args, **kwargs):
            calls[0] += 1
            if calls[0] == crash_at:
                os._exit(9)  # a crash: no cleanup, no rollback
            return real(*args, **kwargs)
        return f

    with lio.atomic_dir(target) as tmp:
        (tmp / "a.bin").write_bytes(b"new" * 1000)
        (tmp / "b.txt").write_text("new")
        os.replace, os.rename, shutil.rmtree = step(os.replace), step(os.rename), step(shutil.rmtree)
        if exchange:
            lio.exchange_paths = step(lio.exchange_paths)
""")


def _write(path: Path, tag: str) -> None:
    with lowbit.io.atomic_dir(path) as tmp:
        (tmp / "a.bin").write_bytes(tag.encode() * 1000)
        (tmp / "b.txt").write_text(tag)


def _read(path: Path) -> str:
    """What a reader finds: the complete old or new result (both files from the same write)."""
    recover = getattr(lowbit.io, "recover_dir", None)
    if recover is not None:
        recover(path)
    tag = (path / "b.txt").read_text()
    assert (path / "a.bin").read_bytes() == tag.encode() * 1000
    return tag


@pytest.mark.parametrize("exchange", [False, True])
@pytest.mark.parametrize("crash_at", [1, 2, 3])
def test_a_crash_at_any_step_of_the_swap_leaves_a_complete_result(tmp_path, crash_at, exchange):
    if exchange:
        a, b = tmp_path / "x", tmp_path / "y"
        a.mkdir(), b.mkdir()
        if not lowbit.io.exchange_paths(a, b):
            pytest.skip("this file system has no atomic exchange")
    target = tmp_path / "result"
    _write(target, "old")
    r = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, str(target), str(crash_at), str(int(exchange))],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode in (0, 9), r.stderr
    assert _read(target) in ("old", "new")
    if r.returncode == 0:
        assert _read(target) == "new"
    _write(target, "newer")  # the next write starts from a consistent state
    assert _read(target) == "newer"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".result.lowbit-old")]
    assert leftovers == []


def test_an_error_mid_swap_keeps_the_old_result(tmp_path, monkeypatch):
    target = tmp_path / "result"
    _write(target, "old")
    monkeypatch.setattr(lowbit.io, "exchange_paths", lambda a, b: False)
    real = lowbit.io.os.rename
    calls = []

    def failing(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # moving the new directory in
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(lowbit.io.os, "rename", failing)
    with pytest.raises(OSError, match="disk full"):
        _write(target, "new")
    monkeypatch.setattr(lowbit.io.os, "rename", real)
    assert (target / "b.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]


def test_atomic_dir_fsyncs_the_new_result(tmp_path, monkeypatch):
    import os

    synced = []
    real = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd)
        return real(fd)

    monkeypatch.setattr(lowbit.io.os, "fsync", record)
    with lowbit.io.atomic_dir(tmp_path / "r") as tmp:
        (tmp / "w.bin").write_bytes(b"x")
    if not os.path.exists("/proc/self/fd"):
        assert len(synced) >= 3
        return
    names = [Path(p).name for p in synced]
    assert "w.bin" in names  # the file's data
    assert any(n.startswith(".r.") and n.endswith(".tmp") for n in names)  # the new directory's entries
    assert names[-1] == tmp_path.name  # the parent, after the rename


# ---------------------------------------------------------------------------------------------- ignored settings

@bad_input("ApiQ-bw with quant.sym or quant.clip_search")
def test_apiq_refuses_sym_and_clip_search_before_any_work(fp_model, calib):
    cfg = AdapterConfig(init="apiq-bw", rank=4, init_options={"apiq_epochs": 0})
    for kw, match in ((dict(sym=True), "quant.sym=true is not implemented"),
                      (dict(clip_search=True), "quant.clip_search=true would be ignored")):
        quant = QuantConfig(method="rtn", bits=2, group_size=32, **kw)
        m = copy.deepcopy(fp_model)
        with pytest.raises(ValueError, match=match):
            apply_adapters(m, cfg, calib, quant=quant, progress=False)
        assert not adapter_modules(m)
        with pytest.raises(ValueError, match=match):
            cfg.check_quant(quant)  # no model needed: a recipe can check before loading anything


@bad_input("NormalFloat with clip_search")
def test_nf_refuses_clip_search():
    with pytest.raises(ValueError, match="method 'nf' has no use for clip_search=True"):
        QuantConfig(method="nf", bits=4, clip_search=True)


@pytest.mark.parametrize("sym,clip", [(True, False), (False, True), (True, True)])
def test_loftq_uniform_honours_sym_and_clip_search(fp_model, sym, clip):
    from lowbit.adapters import loftq_init
    from lowbit.quant.rtn import rtn_quantize

    W = fp_model.model.layers[0].self_attn.q_proj.weight.detach().float()
    ref = rtn_quantize(W, 2, 32, sym=sym, clip_search=clip)  # one alternation from B A = 0: Q = quant(W)
    qw, _, _ = loftq_init(W, 2, rank=4, iters=1, quantizer="uniform", group_size=32, sym=sym, clip_search=clip)
    assert torch.equal(qw.dequantize(), ref.dequantize())
    # The registered init takes them from quant: its base is the same.
    m = copy.deepcopy(fp_model)
    apply_adapters(m, AdapterConfig(init="loftq", rank=4, targets=["q_proj"], init_options={"loftq_iters": 1}),
                   quant=QuantConfig(method="rtn", bits=2, group_size=32, sym=sym, clip_search=clip), progress=False)
    base = m.model.layers[0].self_attn.q_proj.base
    assert torch.equal(base.dequantize(torch.float32), ref.dequantize())
