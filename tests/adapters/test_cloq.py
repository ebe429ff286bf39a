import pytest
import torch

from lowbit.adapters import cloq_init
from lowbit.adapters.cloq import cloq_objective
from lowbit.quant import rtn_quantize


def _ill_conditioned_x(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    return X * torch.logspace(0, -3, d, dtype=torch.float64)[None, :] * 10  # column scales span 1e3


def _setup(out=48, inp=40, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    Q = rtn_quantize(W.float(), 2, 8).dequantize().double()
    X = _ill_conditioned_x(n, inp, seed)
    return W, Q, X, X.T @ X


def test_objective_equals_svd_tail():
    W, Q, X, H = _setup()
    r = 6
    A, B = cloq_init(W, Q, H, r, damp=0.0)
    assert A.shape == (r, 40) and B.shape == (48, r) and A.dtype == torch.float64
    E = W - Q
    direct = float(((X @ (E - B @ A).T) ** 2).sum())
    R = torch.linalg.cholesky(H).T  # any R with R^T R = H
    s = torch.linalg.svdvals(R @ E.T)
    tail = float((s[r:] ** 2).sum())
    assert direct == pytest.approx(tail, rel=1e-6)
    assert cloq_objective(E, H, B @ A) == pytest.approx(tail, rel=1e-6)


def test_beats_plain_svd_and_perturbations():
    W, Q, X, H = _setup(seed=3)
    r = 4
    E = W - Q
    A, B = cloq_init(W, Q, H, r, damp=0.0)
    best = cloq_objective(E, H, B @ A)
    U, S, Vh = torch.linalg.svd(E)
    svd_obj = cloq_objective(E, H, U[:, :r] @ torch.diag(S[:r]) @ Vh[:r])
    assert best < 0.9 * svd_obj  # weighting by H matters on ill-conditioned X
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        dA = 1e-3 * torch.randn(A.shape, generator=g, dtype=torch.float64)
        dB = 1e-3 * torch.randn(B.shape, generator=g, dtype=torch.float64)
        assert cloq_objective(E, H, (B + dB) @ (A + dA)) >= best * (1 - 1e-12)


def test_rank_deficient_h_gives_finite_answer():
    W, Q, _, _ = _setup()
    X = torch.randn(10, 40, dtype=torch.float64)  # rank 10 < 40
    X[:, 5] = 0  # a dead input
    H = X.T @ X
    for damp in (0.0, 0.01):
        A, B = cloq_init(W, Q, H, 8, damp=damp)
        assert torch.isfinite(A).all() and torch.isfinite(B).all()
        E = W - Q
        # still no worse than doing nothing, and with damp 0 it fits the seen subspace (rank 10 > 8: tail only)
        assert cloq_objective(E, H, B @ A) <= cloq_objective(E, H, torch.zeros_like(E))


def test_float32_inputs_and_bad_input():
    W, Q, _, H = _setup()
    A, B = cloq_init(W.float(), Q.float(), H.float(), 4)
    assert A.dtype == torch.float32
    with pytest.raises(ValueError, match="rank"):
        cloq_init(W, Q, H, 40)
    with pytest.raises(ValueError, match="H must be"):
        cloq_init(W, Q, H[:10, :10], 4)
    with pytest.raises(ValueError, match="NaN"):
        cloq_init(W * float("nan"), Q, H, 4)


def test_split_is_balanced_per_component_and_independent_of_h_scale():
    """The product is CLoQ's closed form (Deng et al. 2025, arXiv 2501.18475); each component has
    ‖B_:,i‖ = ‖A_i,:‖, and scaling H (more calibration tokens) changes neither factor — with the raw split
    ``A = Σ^{1/2} U^T R^{-T}``, ``B = V Σ^{1/2}`` it moves them by k^{∓1/4}."""
    W, Q, X, H = _setup()
    r = 6
    A, B = cloq_init(W, Q, H, r, damp=0.0)
    assert torch.allclose(A.norm(dim=1), B.norm(dim=0), rtol=1e-10)
    # Same product as the unbalanced closed form A^T = R^{-1} U_r Σ_r^{1/2}, B^T = Σ_r^{1/2} V_r^T.
    R = torch.linalg.cholesky(H).T
    U, S, Vh = torch.linalg.svd(R @ (W - Q).T, full_matrices=False)
    product = (torch.linalg.solve(R, U[:, :r] * S[:r]) @ Vh[:r]).T
    assert torch.allclose(B @ A, product, rtol=0, atol=1e-9 * product.abs().max())
    A2, B2 = cloq_init(W, Q, 1e4 * H, r, damp=0.0)
    assert torch.allclose(A2.abs(), A.abs(), rtol=1e-8, atol=1e-12)
    assert torch.allclose(B2.abs(), B.abs(), rtol=1e-8, atol=1e-12)
