"""add_outlier_channels: the function is preserved (float64 reference; bit-exact with a power-of-two factor in fp16),
the chosen columns really grow, grouped-query attention is handled, and 2-bit min-max RTN error grows with it."""

import copy

import pytest
import torch

from lowbit.models.tiny.outliers import add_outlier_channels
from lowbit.quant.rtn import rtn_quantize


def _llama(kv_heads=4, bias=False, dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, attention_bias=bias, mlp_bias=bias, max_position_embeddings=64)
    m = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # trained-looking gains and biases rather than the all-ones/zeros init
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.rand_like(p) + 0.5 if "norm" in n else 0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("kv_heads,bias", [(4, False), (2, True), (1, False)])
def test_function_preserved_float64(kv_heads, bias):
    m = _llama(kv_heads, bias)
    ids = torch.randint(0, 96, (2, 24))
    ref = m(ids).logits
    m2 = copy.deepcopy(m)
    rec = add_outlier_channels(m2, fraction=0.1, factor=5.0, seed=3)  # not a power of two: exact only up to rounding
    assert torch.allclose(m2(ids).logits, ref, rtol=0, atol=1e-10)
    # The recorded channels (and only they) of every q and down column were multiplied by the factor.
    for layer, layer2, r in zip(m.model.layers, m2.model.layers, rec["layers"]):
        ratio = (layer2.self_attn.q_proj.weight / layer.self_attn.q_proj.weight)[0]
        assert torch.nonzero((ratio - 1).abs() > 1e-9).flatten().tolist() == r["qkv_in"]
        assert torch.allclose(ratio[r["qkv_in"]], torch.full((len(r["qkv_in"]),), 5.0, dtype=torch.float64))
        ratio = (layer2.mlp.down_proj.weight / layer.mlp.down_proj.weight)[0]
        assert torch.nonzero((ratio - 1).abs() > 1e-9).flatten().tolist() == r["down_in"]
        assert len(r["qkv_in"]) == round(0.1 * 64) and len(r["down_in"]) == round(0.1 * 128)


def test_power_of_two_factor_is_bit_exact_in_float32():
    m = _llama(dtype=torch.float32)
    ids = torch.randint(0, 96, (2, 16))
    ref = m(ids).logits
    add_outlier_channels(m, fraction=0.05, factor=8.0)
    assert torch.equal(m(ids).logits, ref)


def test_two_bit_rtn_error_grows():
    m = _llama()
    m2 = copy.deepcopy(m)
    add_outlier_channels(m2, fraction=0.05, factor=8.0)

    # Error of the function the layer computes: the rescaled weight's error mapped back through the gains.
    w = m.model.layers[0].self_attn.q_proj.weight
    w2 = m2.model.layers[0].self_attn.q_proj.weight
    c = w2[0] / w[0]
    before = (rtn_quantize(w.float(), 2, 32).dequantize().double() - w).norm() / w.norm()
    after = (rtn_quantize(w2.float(), 2, 32).dequantize().double() / c - w).norm() / w.norm()
    assert after > 1.5 * before, (before, after)


@pytest.mark.parametrize("kw,match", [({"fraction": 0.0}, "fraction"), ({"factor": -2.0}, "factor"),
                                      ({"fraction": 1.5}, "fraction")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        add_outlier_channels(_llama(), **kw)


def test_not_a_llama():
    with pytest.raises(ValueError, match="LLaMA"):
        add_outlier_channels(torch.nn.Linear(4, 4))
