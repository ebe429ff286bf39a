import math

import pytest
import torch
from torch import nn

from lowbit.adapters import LoRALinear
from lowbit.quant import QuantLinear, nf_quantize


def test_forward_matches_formula_and_zero_init():
    torch.manual_seed(0)
    base = nn.Linear(32, 48)
    m = LoRALinear(base, rank=4, alpha=8)
    assert m.lora_A.shape == (4, 32) and m.lora_B.shape == (48, 4)
    x = torch.randn(3, 32)
    assert torch.equal(m(x), base(x))  # B = 0
    with torch.no_grad():
        m.lora_B.normal_()
    ref = base(x).double() + 2.0 * x.double() @ m.lora_A.double().T @ m.lora_B.double().T
    assert torch.allclose(m(x).double(), ref, atol=1e-5)


def test_rslora_scaling_and_grads_only_on_adapter():
    base = nn.Linear(32, 32)
    m = LoRALinear(base, rank=16, alpha=8, rslora=True)
    assert m.scaling == pytest.approx(8 / math.sqrt(16))
    m(torch.randn(2, 32)).sum().backward()
    assert base.weight.grad is None and m.lora_B.grad is not None


def test_quantized_base_as_dense_and_merge():
    torch.manual_seed(0)
    W = torch.randn(64, 64)
    q = QuantLinear.from_quantized(nf_quantize(W, 4, 64))
    m = LoRALinear(q, 8, 16)
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(4, 64)
    assert torch.allclose(m(x), x @ m.as_dense().T, atol=1e-4)
    with pytest.raises(TypeError):
        m.merge()
    f = LoRALinear(nn.Linear(64, 64), 8, 16)
    with torch.no_grad():
        f.lora_B.normal_()
    y = f(x)
    f.merge()
    assert torch.allclose(f(x), y, atol=1e-5)


@pytest.mark.parametrize("rank", [0, 32, 40])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(64, 32), rank, 16)


def test_adapter_branch_stays_fp32_under_autocast():
    from lowbit.adapters import DiaBloLinear

    torch.manual_seed(0)
    x = torch.randn(16, 256)
    for make in (lambda b: LoRALinear(b, 32, 32), lambda b: DiaBloLinear(b, 8)):
        base = nn.Linear(256, 256)
        with torch.no_grad():
            base.weight.zero_()
            base.bias.zero_()
        m = make(base)
        with torch.no_grad():
            for p in m.parameters(recurse=False):
                p.normal_()
        delta = m(x)  # fp32 everywhere
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        # a zero base leaves only the adapter: computed in fp32 and rounded once to bf16 at the end
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, delta.to(torch.bfloat16))
