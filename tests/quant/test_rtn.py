"""RTN min-max quantization (lowbit.quant.rtn) against an independent float64 reference (docs/METHODS.md).

Reference formulas, per output row and group:
``xmin = min(min w, 0)``, ``xmax = max(max w, 0)`` (both 0 -> ``[-1, 1]``), ``maxq = 2^bits - 1``;
asym ``scale = (xmax - xmin)/maxq``, ``zero = round(-xmin/scale)``;
sym ``xmax = max(|xmin|, xmax)``, ``scale = 2 xmax/maxq``, ``zero = (maxq+1)/2``;
``q = clamp(round(w/scale) + zero, 0, maxq)``, ``dequant = scale (q - zero)``.

One deliberate library convention is mirrored in the reference: the scale is rounded to the nearest
fp16-representable value *before* the zero point and the codes are computed (``scale.half().double()``), so
that the fp16 scales stored by ``QuantLinear`` dequantise to exactly the same weights. docs/METHODS.md, Quantization
("Storage") keeps scales in fp16, so this is the quantizer the stored model actually represents. (The
library also clamps the scale to ≥ 2^-24, the smallest fp16 subnormal; no test matrix here gets near it.)
"""

from __future__ import annotations

import pytest
import torch

from lowbit.quant import rtn_quantize


def ref_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 min-max parameters per row of ``w`` ``(rows, g)``."""
    w = w.double()
    maxq = 2**bits - 1
    xmin = torch.clamp(w.min(dim=1).values, max=0.0)
    xmax = torch.clamp(w.max(dim=1).values, min=0.0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    both0 = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both0, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(both0, torch.full_like(xmax, 1.0), xmax)
    scale = (2 * xmax if sym else xmax - xmin) / maxq
    scale = scale.half().double()  # library convention: fp16-representable scales (see module docstring)
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def ref_rtn(W: torch.Tensor, bits: int, group_size: int, sym: bool):
    """Codes, dequantized weights, and per-element scale/zero (all float64), group by group."""
    out, n = W.shape
    g = n if group_size == -1 else group_size
    maxq = 2**bits - 1
    codes = torch.empty(out, n, dtype=torch.float64)
    S = torch.empty(out, n, dtype=torch.float64)
    Z = torch.empty(out, n, dtype=torch.float64)
    for s in range(0, n, g):
        w = W[:, s:s + g].double()
        scale, zero = ref_params(w, bits, sym)
        codes[:, s:s + g] = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, maxq)
        S[:, s:s + g] = scale[:, None]
        Z[:, s:s + g] = zero[:, None]
    return codes, S * (codes - Z), S, Z


def make_weight(out: int, n: int, seed: int) -> torch.Tensor:
    """Random float32 weight with an all-zero row, an all-negative row, an all-positive row and outliers."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=g) * 0.05
    W[1] = 0.0
    W[2] = -W[2].abs() - 0.01
    W[3] = W[3].abs() + 0.01
    W[4, 5] = 1.5  # outlier
    return W


CASES = [(bits, gs, sym) for bits in (2, 3, 4, 8) for gs in (-1, 16, 64) for sym in (False, True)]


@pytest.mark.parametrize("bits,group_size,sym", CASES)
def test_matches_float64_reference(bits, group_size, sym):
    W = make_weight(12, 128, seed=bits * 100 + (group_size % 97) + sym)
    qw = rtn_quantize(W, bits, group_size=group_size, sym=sym)
    codes, deq, S, Z = ref_rtn(W, bits, group_size, sym)
    assert qw.codes.dtype == torch.uint8
    assert torch.equal(qw.codes.double(), codes)
    assert torch.allclose(qw.dequantize().double(), deq, rtol=0, atol=1e-7)
    # The stored per-group parameters are the reference ones.
    g = 128 if group_size == -1 else group_size
    assert torch.allclose(qw.scales.double(), S[:, ::g], rtol=1e-7, atol=0)
    assert torch.equal(qw.zeros.double(), Z[:, ::g])
    # All-zero row: range [-1, 1], dequantises to exactly 0.
    assert torch.all(qw.dequantize()[1] == 0)
    assert torch.allclose(qw.scales[1].double(), torch.tensor(2 / (2**bits - 1)).half().double())


@pytest.mark.parametrize("bits,group_size,sym", CASES)
def test_error_at_most_half_step_inside_range(bits, group_size, sym):
    W = make_weight(12, 128, seed=7 + bits)
    qw = rtn_quantize(W, bits, group_size=group_size, sym=sym)
    g = 128 if group_size == -1 else group_size
    S = qw.scales.double().repeat_interleave(g, dim=1)
    Z = qw.zeros.double().repeat_interleave(g, dim=1)
    lo, hi = -Z * S, (2**bits - 1 - Z) * S  # the grid's first and last points
    Wd = W.double()
    err = (qw.dequantize().double() - Wd).abs()
    # "Inside the range": within half a step of the grid's span -> the nearest grid point is ≤ scale/2 away.
    inside = (Wd >= lo - S / 2) & (Wd <= hi + S / 2)
    # Only fp16 rounding of the scale can push a group's extreme weights out (≈1 per group at worst).
    assert inside.float().mean() > 0.9
    assert torch.all(err[inside] <= S[inside] / 2 * (1 + 1e-6))
    # Outside (fp16 rounding of the scale shrinks the grid by ≤ 2^-11 relative) the excess stays tiny.
    assert torch.all(err <= S / 2 + (hi - lo) * 2.0**-10)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [-1, 16])
@pytest.mark.parametrize("sym", [False, True])
def test_clip_search_never_increases_norm24_error(bits, group_size, sym):
    g = torch.Generator().manual_seed(bits + 10 * sym)
    W = torch.randn(16, 64, generator=g)
    W[torch.rand(16, 64, generator=g) < 0.03] *= 8  # outliers: where clipping pays off
    plain = rtn_quantize(W, bits, group_size, sym).dequantize().double()
    clip = rtn_quantize(W, bits, group_size, sym, clip_search=True).dequantize().double()
    gs = 64 if group_size == -1 else group_size

    def err(Q):  # Σ|w - q|^2.4 per (row, group): the search's objective
        return (W.double() - Q).abs().pow(2.4).reshape(16, 64 // gs, gs).sum(-1)

    e_plain, e_clip = err(plain), err(clip)
    assert torch.all(e_clip <= e_plain * (1 + 1e-5))
    if bits == 2:  # at 2 bits with outliers the search must actually find something better somewhere
        assert e_clip.sum() < 0.98 * e_plain.sum()


def test_eight_bit_error_tiny():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(32, 256, generator=g)
    Wg = W.reshape(32, 4, 64)
    for sym in (False, True):
        Q = rtn_quantize(W, 8, group_size=64, sym=sym).dequantize()
        if sym:
            width = 2 * Wg.abs().amax(-1)
        else:
            width = Wg.amax(-1).clamp(min=0) - Wg.amin(-1).clamp(max=0)
        half_step = (width / 255 / 2).repeat_interleave(64, 1)
        # + the grid shrink from rounding the scale to fp16 (≤ 2^-11 relative over 255 steps).
        slack = (width * 2.0**-11).repeat_interleave(64, 1)
        assert torch.all((Q - W).abs() <= half_step + slack)
        assert (Q - W).norm() / W.norm() < 0.01


@pytest.mark.parametrize("bad", [dict(bits=5), dict(bits=4, group_size=-2), dict(bits=4, group_size=0)])
def test_invalid_arguments_raise(bad):
    W = torch.randn(4, 64)
    with pytest.raises(ValueError):
        rtn_quantize(W, **bad)


def test_nan_raises():
    W = torch.randn(4, 64)
    W[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        rtn_quantize(W, 4)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [False, True])
def test_clip_search_is_optimal_over_the_shrink_grid(bits, sym):
    """The clip search minimises Σ|w - q|^2.4 over range shrink factors p ∈ {1, 0.99, …, 0.80}.
    Brute force in float64 over that grid: the library's choice must be (up to float32 noise) the best one."""
    g = torch.Generator().manual_seed(20 + bits + sym)
    W = torch.randn(24, 32, generator=g)
    W[torch.rand(24, 32, generator=g) < 0.05] *= 6
    Wd = W.double()
    maxq = 2**bits - 1
    xmin0, xmax0 = Wd.min(1).values.clamp(max=0), Wd.max(1).values.clamp(min=0)
    best = torch.full((24,), float("inf"), dtype=torch.float64)
    for i in range(21):
        p = 1 - i / 100
        lo, hi = p * xmin0, p * xmax0
        if sym:
            hi = torch.maximum(lo.abs(), hi)
            lo = -hi
        scale = ((hi - lo) / maxq).half().double()
        zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-lo / scale)
        codes = torch.clamp(torch.round(Wd / scale[:, None]) + zero[:, None], 0, maxq)
        q = scale[:, None] * (codes - zero[:, None])
        best = torch.minimum(best, (Wd - q).abs().pow(2.4).sum(1))
    got = (Wd - rtn_quantize(W, bits, sym=sym, clip_search=True).dequantize().double()).abs().pow(2.4).sum(1)
    assert torch.all(got <= best * (1 + 1e-5))


@pytest.mark.parametrize("n,g", [(64, 48), (97, 32), (576, 128)])  # 97 is prime; 576 is SmolLM2's hidden width
@pytest.mark.parametrize("sym,clip", [(False, False), (True, False), (False, True)])
def test_shorter_last_group_is_the_group_quantized_alone(n, g, sym, clip):
    """A group size that does not divide the width gives ``ceil(n/g)`` groups, the last one shorter (as in
    GPTQModel): every group, the short one included, is exactly what RTN gives that group on its own, and the packed
    QuantLinear dequantises to the same weight."""
    from lowbit.quant import QuantLinear

    W = torch.randn(10, n, generator=torch.Generator().manual_seed(n)) * 0.1
    qw = rtn_quantize(W, 3, group_size=g, sym=sym, clip_search=clip)
    assert qw.scales.shape == (10, -(-n // g))
    parts = [rtn_quantize(W[:, s:s + g], 3, group_size=-1, sym=sym, clip_search=clip) for s in range(0, n, g)]
    assert torch.equal(qw.dequantize(), torch.cat([p.dequantize() for p in parts], dim=1))
    assert torch.equal(QuantLinear.from_quantized(qw).dequantize(torch.float32), qw.dequantize())
