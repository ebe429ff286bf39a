import pytest
import torch

from lowbit.adapters import diablo_calibrated_init
from lowbit.adapters.diablo import blocks_to_dense, dense_to_blocks
from lowbit.adapters.diablo_calibrated import diablo_objective
from lowbit.quant import rtn_quantize


def _setup(out=36, inp=44, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    Q = rtn_quantize(W.float(), 2, 4).dequantize().double()
    X = torch.randn(300, inp, generator=g, dtype=torch.float64) @ torch.randn(inp, inp, generator=g,
                                                                                dtype=torch.float64)
    return W, Q, X.T @ X


@pytest.mark.parametrize("N", [4, 5])  # 5 divides neither 44 nor 36
def test_beats_zero_and_plain_blocks_and_is_stationary(N):
    W, Q, H = _setup()
    E = W - Q
    blocks = diablo_calibrated_init(W, Q, H, N, damp=0.0).double()
    obj = diablo_objective(E, H, blocks)
    assert obj <= diablo_objective(E, H, torch.zeros_like(blocks))
    assert obj <= diablo_objective(E, H, dense_to_blocks(E.T, N))
    # Gradient of ‖X(E^T - D)‖² w.r.t. D is -2 H (E^T - D); its diagonal blocks vanish at the optimum.
    D = blocks_to_dense(blocks, 44, 36)
    grad = -2 * H @ (E.T - D)
    gb = dense_to_blocks(grad, N)
    scale = (2 * H @ E.T).abs().max()
    valid = dense_to_blocks(torch.ones(44, 36, dtype=torch.float64), N)  # mask out padding
    assert (gb * valid).abs().max() / scale < 1e-6  # float32 result; a non-optimum sits near 1e-1


def test_identity_h_gives_diagonal_blocks_of_et():
    W, Q, _ = _setup()
    blocks = diablo_calibrated_init(W, Q, torch.eye(44, dtype=torch.float64), 4, damp=0.0)
    assert torch.allclose(blocks.double(), dense_to_blocks((W - Q).T, 4), atol=1e-6)


def test_singular_block_stays_finite_and_bad_input():
    W, Q, _ = _setup()
    X = torch.randn(5, 44, dtype=torch.float64)
    X[:, :11] = 0  # the first input block is dead
    blocks = diablo_calibrated_init(W, Q, X.T @ X, 4, damp=0.0)
    assert torch.isfinite(blocks).all()
    with pytest.raises(ValueError, match="num_blocks"):
        diablo_calibrated_init(W, Q, X.T @ X, 40)
