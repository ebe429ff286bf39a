"""The Walsh–Hadamard matrices and the fast transform behind QWHA, checked against their definition: ±1 entries and
``H Hᵀ = d·I`` for every base order and every supported order up to 1024, the fast transform equal to the dense
``x Hᵀ/√d`` and to a plain butterfly, orthogonality at LLaMA sizes, and the refusal of other orders."""

import pytest
import torch

from lowbit.adapters.hadamard import (
    BASE_ORDERS,
    base_matrix,
    hadamard_matrix,
    hadamard_split,
    paley1,
    paley2,
    walsh_hadamard,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_BASES = sorted(set(BASE_ORDERS.values()))


def _is_hadamard(H: torch.Tensor) -> bool:
    d = H.shape[0]
    return bool((H.abs() == 1).all()) and torch.equal(H @ H.T, d * torch.eye(d, dtype=H.dtype))


def _primes(lo, hi):
    return [p for p in range(lo, hi) if p > 1 and all(p % k for k in range(2, int(p**0.5) + 1))]


def test_every_base_order_is_hadamard():
    assert {12, 20, 28, 36, 172} <= set(ALL_BASES)  # LLaMA / SmolLM2 / tiny: 11008, 576, 1536, 768, 5120, 14336
    for K in ALL_BASES:
        assert _is_hadamard(base_matrix(K)), K


def test_every_supported_order_up_to_1024_is_hadamard():
    orders = [d for d in range(1, 1025) if _supported(d)]
    assert len(orders) > 50 and 1024 in orders and 768 in orders and 688 in orders  # 688 = 172·4
    for d in orders:
        assert _is_hadamard(hadamard_matrix(d)), d


def _supported(d):
    try:
        hadamard_split(d)
        return True
    except ValueError:
        return False


def test_paley_constructions_for_every_prime():
    for q in _primes(3, 252):
        if q % 4 == 3:
            assert _is_hadamard(paley1(q)), q
        elif q <= 127:
            assert _is_hadamard(paley2(q)), q
    with pytest.raises(ValueError, match="Paley I needs"):
        paley1(13)
    with pytest.raises(ValueError, match="Paley II needs"):
        paley2(11)


@pytest.mark.parametrize("d,split", [(11008, (172, 6)), (576, (36, 4)), (1536, (12, 7)), (768, (12, 6)),
                                     (4096, (1, 12)), (5120, (20, 8)), (14336, (28, 9)), (13824, (108, 7))])
def test_model_sizes(d, split):
    """The projection sizes of LLaMA-2-7B, SmolLM2-135M, the tiny model, LLaMA-2-13B and LLaMA-3-8B; the transform
    is orthogonal there (‖x Uᵀ‖ = ‖x‖, and the adjoint inverts it)."""
    assert hadamard_split(d) == split
    x = torch.randn(3, d, dtype=torch.float64)
    y = walsh_hadamard(x)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-12)
    assert torch.allclose(walsh_hadamard(y, adjoint=True), x, atol=1e-12)


@pytest.mark.parametrize("d", [52, 6, 100, 23 * 64, 29 * 16, 3, 2 * 258])
def test_other_orders_are_refused_with_the_supported_list(d):
    with pytest.raises(ValueError, match=r"2\^m or K·2\^m with K in \[12, 20, 28, 36, 44, .*172"):
        hadamard_split(d)
    with pytest.raises(ValueError, match="supported orders"):
        walsh_hadamard(torch.zeros(2, d))


@pytest.mark.parametrize("d", [1, 2, 64, 128, 256, 12, 24, 96, 36, 172, 344, 200, 252 * 2, 768])
def test_fast_transform_equals_dense(d):
    x = torch.randn(4, 2, d, dtype=torch.float64)
    H = hadamard_matrix(d)
    assert torch.allclose(walsh_hadamard(x), x @ H.T / d**0.5, atol=1e-12)
    assert torch.allclose(walsh_hadamard(x, adjoint=True), x @ H / d**0.5, atol=1e-12)


def _butterfly(x):
    """The textbook in-place Walsh–Hadamard butterflies (Sylvester order), unnormalised."""
    x = x.clone()
    n, h = x.shape[-1], 1
    while h < n:
        for i in range(0, n, 2 * h):
            a, b = x[..., i:i + h].clone(), x[..., i + h:i + 2 * h].clone()
            x[..., i:i + h], x[..., i + h:i + 2 * h] = a + b, a - b
        h *= 2
    return x


def test_three_sylvester_factors_equal_butterflies():
    d = 2**15  # split into three factors of 32
    x = torch.randn(2, d, dtype=torch.float64)
    assert torch.allclose(walsh_hadamard(x) * d**0.5, _butterfly(x), atol=1e-9)


def test_gradient_is_the_adjoint():
    for d in (24, 64):
        x = torch.randn(3, d, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: walsh_hadamard(t), (x,))
        assert torch.autograd.gradcheck(lambda t: walsh_hadamard(t, adjoint=True), (x,))
