import pytest
import torch

from lowbit.adapters import loftq_init


@pytest.mark.parametrize("bits,quantizer", [(4, "nf"), (2, "nf"), (4, "uniform"), (2, "uniform")])
def test_error_decreases_and_never_rises_more_than_1pct(bits, quantizer):
    torch.manual_seed(0)
    # A weight with a strong low-rank component, as LoftQ assumes of pre-trained weights.
    W = torch.randn(128, 8) @ torch.randn(8, 128) * 0.3 + torch.randn(128, 128) * 0.05
    hist = []
    qw, A, B = loftq_init(W, bits, rank=8, iters=5, quantizer=quantizer, group_size=64, history=hist)
    assert len(hist) == 5
    err = (W - qw.dequantize() - B @ A).norm().item()
    assert err == pytest.approx(hist[-1], rel=1e-4)
    assert hist[-1] < hist[0]
    for a, b in zip(hist, hist[1:]):
        assert b <= a * 1.01
    # iteration 1 is plain quantization + SVD of its error; more iterations must beat it
    one = []
    loftq_init(W, bits, 8, iters=1, quantizer=quantizer, history=one)
    assert hist[-1] < one[0]


def test_scaling_divides_factors():
    torch.manual_seed(0)
    W = torch.randn(64, 64)
    qw, A, B = loftq_init(W, 4, 4, iters=1)
    _, A2, B2 = loftq_init(W, 4, 4, iters=1, scaling=4.0)
    assert torch.allclose(4.0 * B2 @ A2, B @ A, atol=1e-5)


def test_bad_input():
    W = torch.randn(64, 64)
    with pytest.raises(ValueError, match="quantizer"):
        loftq_init(W, 4, 4, quantizer="gptq")
    with pytest.raises(ValueError, match="bits"):
        loftq_init(W, 3, 4, quantizer="nf")
    with pytest.raises(ValueError, match="rank"):
        loftq_init(W, 4, 64)
