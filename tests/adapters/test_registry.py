"""A new adapter and a new initialisation plug in through the registries alone: a toy diagonal adapter
``y = base(x) + x * d`` (square layers) and a toy init that sets ``d`` to the diagonal of the quantization error."""

import copy
import json

import pytest
import torch
from tiny_models import random_llama
from torch import nn
from toy_adapter import ToyDiag, toy_init

from lowbit.adapters import AdapterConfig, AdapterLayer, apply_adapters, load_adapter, save_adapter
from lowbit.adapters.model import adapter_modules, count_parameters
from lowbit.adapters.registry import (
    ADAPTERS,
    INITS,
    register_adapter,
    register_init,
    scoped_registrations,
    unregister_adapter,
    unregister_init,
)
from lowbit.quant import QuantConfig, quantize_model

TARGETS = ["q_proj", "v_proj", "o_proj"]  # square (64 x 64) in the tiny model


@pytest.fixture
def toy():
    with scoped_registrations():
        register_adapter("toy")(ToyDiag)
        register_init("toy-init", adapters=("toy",), needs_float_weights=True, quantizers=("rtn",))(toy_init)
        yield
    assert "toy" not in ADAPTERS and "toy-init" not in INITS


@pytest.fixture(scope="module")
def fp_model():
    return random_llama(hidden=64, layers=2, heads=4, intermediate=128, vocab_size=320, seed=0)


QUANT = QuantConfig(method="rtn", bits=2, group_size=32)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_config_accepts_registered_names_only(toy):
    cfg = AdapterConfig(adapter="toy", init="toy-init", targets=TARGETS)
    assert cfg.init_spec.needs_float_weights and not cfg.needs_calibration
    AdapterConfig(adapter="toy")  # "default" serves every adapter
    with pytest.raises(ValueError, match=r"not available for toy; choose one of \['default', 'toy-init'\]"):
        AdapterConfig(adapter="toy", init="cloq")
    with pytest.raises(ValueError, match="not available for lora"):
        AdapterConfig(adapter="lora", init="toy-init")


def test_apply_wraps_counts_and_initialises(toy, fp_model):
    m = copy.deepcopy(fp_model)
    rep = apply_adapters(m, AdapterConfig(adapter="toy", init="toy-init", targets=TARGETS), quant=QUANT,
                         progress=False)
    mods = adapter_modules(m)
    assert rep["modules"] == len(mods) == 6 and all(isinstance(w, ToyDiag) for w in mods.values())
    assert not isinstance(m.model.layers[0].self_attn.k_proj, AdapterLayer)
    assert rep["trainable"] == 6 * 64 == count_parameters(m)["trainable"]
    assert [n for n, p in m.named_parameters() if p.requires_grad] == [f"{n}.diag" for n in mods]
    name = "model.layers.1.self_attn.v_proj"
    W = fp_model.get_submodule(name).weight.detach().float()
    Q = mods[name].base.dequantize(torch.float32)
    assert torch.equal(mods[name].diag.detach(), torch.diagonal(W - Q))
    with pytest.raises(ValueError, match="uses its own quantizer"):
        apply_adapters(copy.deepcopy(fp_model), AdapterConfig(adapter="toy", init="toy-init", targets=TARGETS),
                       quant=QuantConfig(method="nf", bits=4, group_size=32), progress=False)
    with pytest.raises(ValueError, match="square"):
        apply_adapters(copy.deepcopy(fp_model), AdapterConfig(adapter="toy", targets=["up_proj"]), progress=False)


def test_trains_only_the_adapter_and_round_trips(toy, fp_model, tmp_path):
    m = copy.deepcopy(fp_model)
    apply_adapters(m, AdapterConfig(adapter="toy", targets=TARGETS), quant=QUANT, progress=False)
    ids = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    losses = []
    for _ in range(3):
        loss = m(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in m.parameters() if not p.requires_grad)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(w.diag.abs().sum() > 0 for w in adapter_modules(m).values())
    ref = _logits(m, ids)

    save_adapter(m, tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["peft_type"] == "LOWBIT_TOY"
    base = copy.deepcopy(fp_model)
    quantize_model(base, QUANT, progress=False)
    load_adapter(base, tmp_path / "ad")
    assert torch.equal(_logits(base, ids), ref)
    assert count_parameters(base)["trainable"] == 0


def test_registering_an_existing_name_raises(toy):
    class Other(ToyDiag):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_adapter("lora")(Other)
    with pytest.raises(ValueError, match="already registered"):
        register_adapter("toy")(Other)
    with pytest.raises(ValueError, match="already registered"):
        register_init("cloq")(toy_init)
    with pytest.raises(TypeError, match="AdapterLayer"):
        register_adapter("plain")(nn.Linear)


def test_unregister_helpers():
    register_adapter("toy2")(type("Toy2", (ToyDiag,), {}))
    register_init("toy2-init", adapters=("toy2",))(toy_init)
    try:
        AdapterConfig(adapter="toy2", init="toy2-init")
    finally:
        unregister_init("toy2-init")
        unregister_adapter("toy2")
    with pytest.raises(ValueError, match="unknown adapter 'toy2'"):
        AdapterConfig(adapter="toy2")
