import copy
import json

import pytest
import torch
from tiny_models import random_llama

from lowbit.adapters import AdapterConfig, DiaBloLinear, LoRALinear, apply_adapters, load_adapter, save_adapter
from lowbit.adapters.model import adapter_modules, count_parameters, expected_trainable
from lowbit.quant import QuantConfig, dequantize_model, quantize_model


@pytest.fixture(scope="module")
def fp_model():
    return random_llama(hidden=64, layers=2, heads=4, intermediate=128, vocab_size=320, seed=0)


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 320, (16, 64), generator=g)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def _kl(ref_logits, logits):
    p = ref_logits.log_softmax(-1)
    q = logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_zero_init_reproduces_quantized_logits_exactly(fp_model, calib):
    q = copy.deepcopy(fp_model)
    quantize_model(q, QuantConfig(method="rtn", bits=2, group_size=32), progress=False)
    ref = _logits(q, calib[:4])
    for cfg in (AdapterConfig(adapter="lora", rank=8), AdapterConfig(adapter="diablo", num_blocks=8)):
        m = copy.deepcopy(q)
        rep = apply_adapters(m, cfg, progress=False)
        assert torch.equal(_logits(m, calib[:4]), ref)
        assert rep["modules"] == 14
        # only adapter parameters train
        names = [n for n, p in m.named_parameters() if p.requires_grad]
        assert names and all(("lora_" in n) or n.endswith(".blocks") for n in names)


@pytest.mark.parametrize("adapter,init,quant", [
    ("lora", "cloq", QuantConfig(method="gptq", bits=2, group_size=32)),
    ("diablo", "calibrated", QuantConfig(method="gptq", bits=2, group_size=32)),
    ("lora", "loftq", QuantConfig(method="nf", bits=2, group_size=32)),
    ("lora", "apiq-bw", QuantConfig(method="rtn", bits=2, group_size=32)),
])
def test_calibrated_inits_bring_logits_closer_to_full_precision(fp_model, calib, adapter, init, quant):
    ref = _logits(fp_model, calib)
    kw = dict(rank=8, alpha=16.0) if adapter == "lora" else dict(num_blocks=8)
    extra = dict(init_options={"apiq_epochs": 3}) if init == "apiq-bw" else {}
    zero = copy.deepcopy(fp_model)
    if init in ("loftq", "apiq-bw"):
        # the zero-init counterpart sits on the same quantizer without the joint optimisation
        quantize_model(zero, quant, calib, progress=False)
        apply_adapters(zero, AdapterConfig(adapter=adapter, **kw), progress=False)
    else:
        apply_adapters(zero, AdapterConfig(adapter=adapter, **kw), calib, quant=quant, progress=False)
    init_m = copy.deepcopy(fp_model)
    apply_adapters(init_m, AdapterConfig(adapter=adapter, init=init, **kw, **extra), calib, quant=quant,
                   progress=False)
    kl_zero, kl_init = _kl(ref, _logits(zero, calib)), _kl(ref, _logits(init_m, calib))
    assert kl_init < kl_zero, (kl_init, kl_zero)


def test_parameter_counts_follow_formulas(fp_model):
    for cfg in (AdapterConfig(adapter="lora", rank=8, targets=["q_proj", "v_proj", "down_proj"]),
                AdapterConfig(adapter="diablo", num_blocks=8, targets=["q_proj", "v_proj", "down_proj"])):
        m = copy.deepcopy(fp_model)
        rep = apply_adapters(m, cfg, progress=False)
        shapes = [(64, 64), (64, 64), (128, 64)] * 2
        assert rep["trainable"] == expected_trainable(shapes, cfg.adapter, rank=8, num_blocks=8)
        assert rep["base_params"] == sum(p.numel() for p in fp_model.parameters())


def test_llama2_7b_counts_on_meta_device():
    from lowbit.recipes.params import llama2_7b_config, param_table

    rows = param_table(llama2_7b_config())
    got = {(r["adapter"], r["targets"]): r["trainable"] for r in rows}
    # the trainable-parameter counts of the DiaBlo paper (Gurses et al. 2025, arXiv 2506.03230)
    assert got[("diablo N=64", "q,k,v,up,down")] == 70_254_592
    assert got[("lora r=64", "q,k,v,up,down")] == 112_197_632
    assert got[("diablo N=64", "all seven")] == 101_187_584
    assert got[("lora r=64", "all seven")] == 159_907_840


@pytest.mark.parametrize("adapter", ["lora", "diablo"])
def test_save_load_reproduces_logits_exactly(fp_model, calib, tmp_path, adapter):
    quant = QuantConfig(method="rtn", bits=4, group_size=32)
    m = copy.deepcopy(fp_model)
    cfg = AdapterConfig(adapter=adapter, rank=8, num_blocks=8, init="default")
    apply_adapters(m, cfg, quant=quant, progress=False)
    with torch.no_grad():
        for mod in adapter_modules(m).values():
            for p in mod.parameters(recurse=False):
                p.normal_(std=0.05)
    ref = _logits(m, calib[:2])
    save_adapter(m, tmp_path / "ad")
    assert {p.name for p in (tmp_path / "ad").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    base = copy.deepcopy(fp_model)
    quantize_model(base, quant, progress=False)
    load_adapter(base, tmp_path / "ad")
    assert torch.equal(_logits(base, calib[:2]), ref)
    assert count_parameters(base)["trainable"] == 0


def test_peft_loads_lora_on_dequantised_base(fp_model, calib, tmp_path):
    peft = pytest.importorskip("peft")
    quant = QuantConfig(method="gptq", bits=2, group_size=32)
    m = copy.deepcopy(fp_model)
    apply_adapters(m, AdapterConfig(adapter="lora", init="cloq", rank=8), calib, quant=quant, progress=False)
    ref = _logits(m, calib[:2])
    save_adapter(m, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
    # the dequantised base: the same quantized weights as plain nn.Linear
    base = copy.deepcopy(m)
    for name, mod in list(adapter_modules(base).items()):
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, mod.base)
    dequantize_model(base)
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "ad"))
    out = _logits(pm, calib[:2])
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()


def test_load_rejects_adapter_of_another_base(fp_model, tmp_path):
    m = copy.deepcopy(fp_model)
    apply_adapters(m, AdapterConfig(adapter="diablo", num_blocks=8), progress=False)
    save_adapter(m, tmp_path / "ad")
    other = random_llama(hidden=128, layers=2, heads=4, intermediate=256, vocab_size=320)
    with pytest.raises(ValueError, match="does not match"):
        load_adapter(other, tmp_path / "ad")
    deeper = random_llama(hidden=64, layers=3, heads=4, intermediate=128, vocab_size=320)
    with pytest.raises(ValueError, match="different base"):
        load_adapter(deeper, tmp_path / "ad")
    assert not adapter_modules(deeper)


def test_bad_input_fails_fast(fp_model, calib):
    m = copy.deepcopy(fp_model)
    with pytest.raises(ValueError, match="num_blocks 65"):
        apply_adapters(m, AdapterConfig(adapter="diablo", num_blocks=65))
    with pytest.raises(ValueError, match="rank 64"):
        apply_adapters(m, AdapterConfig(adapter="lora", rank=64))
    with pytest.raises(ValueError, match=r"unknown target.*q_proj"):
        apply_adapters(m, AdapterConfig(targets=["query"]))
    with pytest.raises(ValueError, match="needs calibration"):
        apply_adapters(m, AdapterConfig(init="cloq", rank=8), quant=QuantConfig(method="rtn", bits=2))
    with pytest.raises(ValueError, match="pass quant"):
        apply_adapters(m, AdapterConfig(init="cloq", rank=8), calib)
    with pytest.raises(ValueError, match="not available for diablo"):
        AdapterConfig(adapter="diablo", init="cloq")
    assert not adapter_modules(m)  # nothing was changed
    q = copy.deepcopy(fp_model)
    quantize_model(q, QuantConfig(method="rtn", bits=2, group_size=32), progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        apply_adapters(q, AdapterConfig(init="loftq", rank=8), quant=QuantConfig(method="nf", bits=2))


def test_wrapper_types(fp_model):
    m = copy.deepcopy(fp_model)
    apply_adapters(m, AdapterConfig(adapter="diablo", num_blocks=8, targets=["q_proj"]), progress=False)
    assert isinstance(m.model.layers[0].self_attn.q_proj, DiaBloLinear)
    assert not isinstance(m.model.layers[0].self_attn.k_proj, (DiaBloLinear, LoRALinear))


def test_loftq_quantizes_the_layers_without_adapter_too(fp_model):
    from lowbit.quant import QuantLinear

    m = copy.deepcopy(fp_model)
    apply_adapters(m, AdapterConfig(init="loftq", rank=8, targets=["q_proj", "v_proj"],
                                    init_options={"loftq_iters": 2}),
                   quant=QuantConfig(method="nf", bits=4, group_size=32), progress=False)
    layer = m.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, LoRALinear)
    for name in ("k_proj", "o_proj"):
        assert isinstance(getattr(layer.self_attn, name), QuantLinear)
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert isinstance(getattr(layer.mlp, name), QuantLinear)


def test_cached_quantized_base_is_reused_exactly_and_cloq_still_helps(fp_model, calib):
    # A cached base is the one every method of a comparison shares; CLoQ's H still comes from the calibration pass
    # (through the already adapted earlier layers), so only the adapters differ from a zero-init run on that base.
    quant = QuantConfig(method="gptq", bits=2, group_size=32)
    base = copy.deepcopy(fp_model)
    quantize_model(base, quant, calib, progress=False)
    cached = copy.deepcopy(fp_model)
    apply_adapters(cached, AdapterConfig(init="cloq", rank=8), calib, quant=quant, progress=False,
                   quantized_base=base)
    for name, m in adapter_modules(cached).items():
        assert torch.equal(m.base.qweight, base.get_submodule(name).qweight)
    zero = copy.deepcopy(base)
    apply_adapters(zero, AdapterConfig(rank=8), progress=False)
    ref = _logits(fp_model, calib)
    assert _kl(ref, _logits(cached, calib)) < _kl(ref, _logits(zero, calib))
