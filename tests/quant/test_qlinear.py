"""QuantLinear (lowbit.quant.qlinear): a packed, frozen layer that must behave exactly like the dense layer
built from the dequantized weight, in value and in input gradient, while storing only packed codes and group
parameters."""

from __future__ import annotations

import pytest
import torch

from lowbit.quant import QuantLinear, gptq_quantize, nf_quantize, rtn_quantize

OUT, IN = 48, 128


def _layer(seed: int = 0, out: int = OUT, inp: int = IN):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=gen) * 0.05
    b = torch.randn(out, generator=gen) * 0.1
    X = torch.randn(256, inp, generator=gen) @ torch.randn(inp, inp, generator=gen) * 0.1
    return W, b, X


def _quantized(kind: str, bits: int, group_size: int, seed: int = 0, out: int = OUT, inp: int = IN):
    W, b, X = _layer(seed, out, inp)
    if kind == "rtn":
        return rtn_quantize(W, bits, group_size=group_size), b
    if kind == "rtn-sym":
        return rtn_quantize(W, bits, group_size=group_size, sym=True), b
    if kind == "gptq-act":  # act-order: non-trivial g_idx
        qw = gptq_quantize(W, X.T @ X, bits, group_size=group_size, act_order=True)
        assert qw.g_idx is not None
        return qw, b
    if kind == "nf":
        return nf_quantize(W, bits, block_size=group_size), b
    raise AssertionError(kind)


VARIANTS = ([("rtn", bits, gs) for bits in (2, 3, 4, 8) for gs in (32, -1)]
            + [("rtn-sym", 3, 32)]
            + [("gptq-act", bits, 32) for bits in (2, 3, 4, 8)]
            + [("nf", bits, gs) for bits in (2, 4) for gs in (64, 32)])
IDS = [f"{k}-{b}b-g{g}" for k, b, g in VARIANTS]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("kind,bits,group_size", VARIANTS, ids=IDS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_acceptance_forward_equals_dense(kind, bits, group_size, with_bias):
    qw, b = _quantized(kind, bits, group_size)
    bias = b if with_bias else None
    m = QuantLinear.from_quantized(qw, bias=bias)
    Wd = qw.dequantize()
    x = torch.randn(7, IN, generator=torch.Generator().manual_seed(1))
    y = m(x)
    ref = x.double() @ Wd.double().T + (0 if bias is None else bias.double())
    assert y.dtype == torch.float32 and y.shape == (7, OUT)
    assert _rel(y, ref) <= 1e-6
    # Elementwise too: fp32 accumulation error is bounded by ~in·eps·|x|·|W| per output.
    bound = 1e-5 * (x.abs().double() @ Wd.abs().double().T) + 1e-7
    assert torch.all((y.double() - ref).abs() <= bound)


@pytest.mark.parametrize("kind,bits,group_size", VARIANTS, ids=IDS)
def test_dequantize_identical_to_quantized_weight(kind, bits, group_size):
    qw, _ = _quantized(kind, bits, group_size)
    m = QuantLinear.from_quantized(qw)
    assert torch.equal(m.dequantize(), qw.dequantize())
    back = m.to_quantized()
    assert torch.equal(back.codes, qw.codes)
    assert torch.equal(back.dequantize(), qw.dequantize())


@pytest.mark.parametrize("kind,bits,group_size", [("rtn", 3, 32), ("gptq-act", 2, 32), ("nf", 4, 64)])
@pytest.mark.parametrize("shape", [(5, IN), (2, 3, IN)])
def test_input_gradient_equals_dense(kind, bits, group_size, shape):
    qw, b = _quantized(kind, bits, group_size)
    m = QuantLinear.from_quantized(qw, bias=b)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=gen)
    R = torch.randn(*shape[:-1], OUT, generator=gen)
    x1 = x.clone().requires_grad_(True)
    (m(x1) * R).sum().backward()
    # Dense reference through autograd (not the closed form): a plain linear with the dequantized weight.
    x2 = x.double().clone().requires_grad_(True)
    y2 = torch.nn.functional.linear(x2, qw.dequantize().double(), b.double())
    (y2 * R.double()).sum().backward()
    assert x1.grad.shape == x.shape
    assert _rel(x1.grad, x2.grad) <= 1e-6
    # Nothing in the module learns.
    assert all(not p.requires_grad for p in m.parameters())
    assert all(not t.requires_grad for t in m.buffers())


@pytest.mark.parametrize("kind,bits,group_size", VARIANTS, ids=IDS)
def test_storage_is_packed_only(kind, bits, group_size):
    qw, b = _quantized(kind, bits, group_size)
    m = QuantLinear.from_quantized(qw, bias=b)
    x = torch.randn(3, IN, requires_grad=True)
    m(x).sum().backward()  # after a forward/backward nothing dense may be left behind either
    assert list(m.parameters()) == []
    tensors = list(m.state_dict().values()) + [v for v in vars(m).values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        assert not (t.is_floating_point() and t.shape == (OUT, IN)), "dense float weight stored"
    assert m.qweight.dtype == torch.int32
    # Bytes: packed codes out·in·bits/8 (IN is a multiple of 32: no padding), fp16 scale+zero 4·out·in/g, plus
    # O(out + in): fp32 bias (4·out), int32 g_idx (4·in), an fp32 NF codebook (≤ 64 B). c = 8 covers
    # 4·out + 4·in + 64 whenever out + in ≥ 16, with 2× headroom on the linear terms.
    g = IN if group_size == -1 else group_size
    state = sum(t.numel() * t.element_size() for t in m.buffers())
    c = 8
    assert state <= OUT * IN * bits / 8 + 4 * OUT * IN / g + c * (OUT + IN)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("kind,bits,group_size", [("rtn", 4, 32), ("gptq-act", 3, 32), ("nf", 4, 64)])
def test_half_precision_inputs(dtype, tol, kind, bits, group_size):
    """Compute in the input dtype; the result must stay within that dtype's rounding of the fp32 result
    (bf16: 8-bit mantissa ≈ 4e-3 per rounding, fp16: 11-bit ≈ 5e-4; a few roundings per 128-term dot)."""
    qw, b = _quantized(kind, bits, group_size)
    m = QuantLinear.from_quantized(qw, bias=b)
    x = torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(3))
    ref = m(x)
    y = m(x.to(dtype))
    assert y.dtype == dtype and y.shape == (2, 5, OUT)
    assert _rel(y.float(), ref) <= tol
    # The half-precision path also backpropagates in the input dtype.
    xh = x.to(dtype).requires_grad_(True)
    m(xh).float().sum().backward()
    assert xh.grad.dtype == dtype


def test_three_dim_input_matches_flattened():
    qw, b = _quantized("rtn", 4, 32)
    m = QuantLinear.from_quantized(qw, bias=b)
    x = torch.randn(2, 6, IN, generator=torch.Generator().manual_seed(4))
    y = m(x)
    assert y.shape == (2, 6, OUT)
    ref = x.reshape(-1, IN).double() @ qw.dequantize().double().T + b.double()
    assert _rel(y.reshape(-1, OUT), ref) <= 1e-6


@pytest.mark.parametrize("kind,bits,group_size", [("rtn", 3, 16), ("rtn", 8, -1), ("nf", 4, 16)])
def test_in_features_not_multiple_of_32(kind, bits, group_size):
    qw, b = _quantized(kind, bits, group_size, out=10, inp=48)
    m = QuantLinear.from_quantized(qw, bias=b)
    assert torch.equal(m.dequantize(), qw.dequantize())
    x = torch.randn(4, 48, generator=torch.Generator().manual_seed(5))
    assert _rel(m(x), x.double() @ qw.dequantize().double().T + b.double()) <= 1e-6


@pytest.mark.parametrize("bad_in", [IN - 1, IN + 32, 1])
def test_wrong_last_dim_raises(bad_in):
    qw, _ = _quantized("rtn", 4, 32)
    m = QuantLinear.from_quantized(qw)
    with pytest.raises(ValueError, match=str(IN)):
        m(torch.randn(3, bad_in))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bits", [2, 4])
def test_codebook_dequantize_bit_identical_in_every_dtype(bits, dtype):
    """The packed-byte codebook gather (a byte's values fetched as one 2/4/8-byte word, or as a row where no
    integer type is that wide) equals ``absmax * codebook[code]`` computed elementwise in ``dtype``."""
    qw, _ = _quantized("nf", bits, 64)
    m = QuantLinear.from_quantized(qw)
    g = qw.codes.shape[1] // qw.scales.shape[1]
    ref = qw.scales.to(dtype).repeat_interleave(g, dim=1) * qw.codebook.to(dtype)[qw.codes.long()]
    assert torch.equal(m.dequantize(dtype), ref)
