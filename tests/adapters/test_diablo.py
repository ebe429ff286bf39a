import pytest
import torch
from torch import nn

from lowbit.adapters import DiaBloLinear
from lowbit.adapters.diablo import blocks_to_dense, dense_to_blocks
from lowbit.quant import QuantLinear, rtn_quantize


def _dense_reference(x, base, blocks, inp, out):
    # Brute force: build the full block-diagonal matrix in float64 and pad/truncate explicitly.
    N, bi, bo = blocks.shape
    full = torch.zeros(N * bi, N * bo, dtype=torch.float64)
    for j in range(N):
        full[j * bi:(j + 1) * bi, j * bo:(j + 1) * bo] = blocks[j].double()
    xp = torch.zeros(*x.shape[:-1], N * bi, dtype=torch.float64)
    xp[..., :inp] = x.double()
    return base(x).double() + (xp @ full)[..., :out]


@pytest.mark.parametrize("inp,out,N", [(64, 96, 8), (70, 50, 8), (33, 65, 4), (16, 16, 16)])
def test_forward_equals_dense_block_diag(inp, out, N):
    torch.manual_seed(0)
    base = nn.Linear(inp, out)
    m = DiaBloLinear(base, N)
    assert m.blocks.shape == (N, -(-inp // N), -(-out // N))
    with torch.no_grad():
        m.blocks.normal_()
    x = torch.randn(3, 5, inp)
    ref = _dense_reference(x, base, m.blocks.detach(), inp, out)
    y = m(x)
    assert y.shape == (3, 5, out)
    assert (y.double() - ref).norm() / ref.norm() < 1e-6


@pytest.mark.parametrize("inp,out,N", [(64, 96, 8), (70, 50, 8)])
def test_block_gradient_is_diagonal_block_of_full_weight_gradient(inp, out, N):
    torch.manual_seed(1)
    base = nn.Linear(inp, out)
    m = DiaBloLinear(base, N)
    with torch.no_grad():
        m.blocks.normal_(std=0.1)
    x = torch.randn(7, inp)
    g = torch.randn(7, out)
    (m(x) * g).sum().backward()
    # Gradient of the dense (padded) D in y = x_pad @ D is x_pad^T g_pad.
    bi, bo = m.blocks.shape[1:]
    xp = torch.zeros(7, N * bi)
    xp[:, :inp] = x
    gp = torch.zeros(7, N * bo)
    gp[:, :out] = g
    full_grad = (xp.double().T @ gp.double())
    for j in range(N):
        ref = full_grad[j * bi:(j + 1) * bi, j * bo:(j + 1) * bo]
        assert torch.allclose(m.blocks.grad[j].double(), ref, atol=1e-5, rtol=1e-5)
    assert base.weight.grad is None  # base frozen


def test_zero_init_is_exactly_the_base_and_runs_fp32_on_half_base():
    torch.manual_seed(0)
    base = nn.Linear(64, 64).to(torch.bfloat16)
    m = DiaBloLinear(base, 8)
    assert m.blocks.dtype == torch.float32 and not m.blocks.any()
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert torch.equal(m(x), base(x))
    with torch.no_grad():
        m.blocks.normal_()
    y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.blocks.grad.dtype == torch.float32


def test_quantized_base_and_as_dense():
    torch.manual_seed(0)
    W = torch.randn(48, 64)
    q = QuantLinear.from_quantized(rtn_quantize(W, 4, 32))
    m = DiaBloLinear(q, 8)
    with torch.no_grad():
        m.blocks.normal_()
    x = torch.randn(5, 64)
    assert torch.allclose(m(x), x @ m.as_dense().T, atol=1e-4)
    with pytest.raises(TypeError, match="quantized"):
        m.merge()


def test_merge_unmerge_roundtrip():
    torch.manual_seed(0)
    base = nn.Linear(40, 24)
    W0 = base.weight.detach().clone()
    m = DiaBloLinear(base, 4)
    with torch.no_grad():
        m.blocks.normal_()
    x = torch.randn(6, 40)
    y = m(x)
    m.merge()
    assert torch.allclose(m(x), y, atol=1e-5)
    m.unmerge()
    assert torch.allclose(base.weight, W0, atol=1e-6)


def test_dense_blocks_roundtrip():
    b = torch.randn(4, 3, 5)
    D = blocks_to_dense(b, 11, 18)
    assert D.shape == (11, 18)
    back = dense_to_blocks(D, 4)
    assert torch.equal(back[:3], b[:3])
    assert torch.equal(back[3, :2, :3], b[3, :2, :3])  # the padded tail was truncated away


@pytest.mark.parametrize("N", [0, 65, -1])
def test_bad_num_blocks(N):
    with pytest.raises(ValueError, match="num_blocks"):
        DiaBloLinear(nn.Linear(64, 128), N)
