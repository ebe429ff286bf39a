"""NormalFloat quantization (lowbit.quant.nf): the published codebooks, nearest-value coding by brute force,
blockwise absmax, and (when installed) agreement with bitsandbytes' NF4.

The absmax is stored in fp16 (docs/METHODS.md, packed storage; bitsandbytes keeps it fp32 unless
double-quantized), so the represented weight is ``round_fp16(absmax) · codebook[code]``, with the code chosen for
``w / round_fp16(absmax)``.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.quant import nf_quantize

# bitsandbytes' NF4 table (QLoRA, Dettmers et al. 2023, Appendix E;
# `bitsandbytes.functional.get_4bit_type("nf4")`).
NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
NF2 = [-1.0, 0.0, 0.3379, 1.0]  # LoftQ


def _weight(out: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=gen) * 0.02
    W[torch.rand(out, n, generator=gen) < 0.01] *= 10
    W[0, :64] = 0.0  # an all-zero block
    W[1, 3] = 0.0
    return W


@pytest.mark.parametrize("bits,table", [(4, NF4), (2, NF2)])
def test_codebook_is_the_published_table(bits, table):
    qw = nf_quantize(_weight(4, 128, 0), bits)
    book = qw.codebook.double()
    assert book.shape == (2**bits,)
    assert torch.allclose(book, torch.tensor(table, dtype=torch.float64), rtol=0, atol=1e-7)
    assert book[0] == -1 and book[-1] == 1 and (book == 0).sum() == 1
    assert torch.all(book[1:] > book[:-1])


@pytest.mark.parametrize("bits,table", [(4, NF4), (2, NF2)])
@pytest.mark.parametrize("block_size", [64, 32, -1])
def test_each_weight_is_nearest_code_times_block_absmax(bits, table, block_size):
    out, n = 6, 192
    W = _weight(out, n, bits + 1)
    qw = nf_quantize(W, bits, block_size=block_size)
    g = n if block_size == -1 else block_size
    Wb = W.double().reshape(out, n // g, g)
    absmax = Wb.abs().amax(-1)
    # One scale per block of g inputs: the block's absmax rounded to fp16 (all-zero block: any scale > 0).
    assert qw.scales.shape == (out, n // g)
    nonzero = absmax > 0
    assert torch.equal(qw.scales.double()[nonzero], absmax.half().double()[nonzero])
    assert torch.all(qw.scales > 0)
    # Brute force over the codebook: the chosen value is (one of) the nearest to w / scale.
    book = torch.tensor(table, dtype=torch.float64)
    x = Wb / qw.scales.double()[..., None]  # (out, G, g)
    dist = (x[..., None] - book).abs()  # (out, G, g, 2^bits)
    chosen = dist.gather(-1, qw.codes.long().reshape(out, n // g, g, 1)).squeeze(-1)
    assert torch.all(chosen <= dist.min(-1).values + 1e-12)
    # Dequantized = nearest value × block absmax (fp16), exactly zero for zero weights.
    deq = qw.dequantize().double()
    expect = (book[dist.argmin(-1)] * qw.scales.double()[..., None]).reshape(out, n)
    assert torch.allclose(deq, expect, rtol=1e-7, atol=0)
    assert torch.all(deq[W == 0] == 0)
    # The block's absmax element lands on an endpoint ±1, i.e. on ±scale.
    assert torch.allclose(deq.reshape(out, n // g, g).abs().amax(-1)[nonzero],
                          qw.scales.double()[nonzero], rtol=1e-7)


@pytest.mark.parametrize("bits", [3, 8, 5, 1])
def test_only_2_and_4_bits(bits):
    with pytest.raises(ValueError, match=str(bits)):
        nf_quantize(torch.randn(4, 64), bits)


@pytest.mark.parametrize("n,g", [(64, 48), (97, 32), (576, 128)])
def test_shorter_last_block_is_the_block_quantized_alone(n, g):
    """A block size that does not divide the width: the last block is shorter and quantizes exactly as that block
    would on its own (its absmax is its own); a non-positive block size is refused."""
    W = torch.randn(6, n, generator=torch.Generator().manual_seed(n))
    qw = nf_quantize(W, 4, block_size=g)
    assert qw.scales.shape == (6, -(-n // g))
    s = (n // g) * g
    head, tail = nf_quantize(W[:, :s], 4, block_size=g), nf_quantize(W[:, s:], 4, block_size=-1)
    assert torch.equal(qw.dequantize(), torch.cat([head.dequantize(), tail.dequantize()], dim=1))
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        nf_quantize(W, 4, block_size=0)


# ---------------------------------------------------------------- bitsandbytes cross-check


def _bnb_nf4(W: torch.Tensor):
    F = pytest.importorskip("bitsandbytes.functional")
    q, state = F.quantize_4bit(W, quant_type="nf4", blocksize=64)
    return F.dequantize_4bit(q, state), state.absmax.reshape(W.shape[0], -1)


def test_matches_bitsandbytes_nf4_when_absmax_is_fp16_exact():
    """With fp16-representable weights every block absmax is fp16-exact, so the two implementations store the
    same scale and must pick the same code: the dequantized weights agree to float32 rounding."""
    W = _weight(16, 256, 7).half().float()
    deq_bnb, absmax_bnb = _bnb_nf4(W)
    qw = nf_quantize(W, 4, block_size=64)
    nonzero = absmax_bnb > 0  # an all-zero block: bnb stores 0, lowbit a tiny positive scale; both give 0
    assert torch.equal(qw.scales.float()[nonzero], absmax_bnb.float()[nonzero])
    scale = qw.scales.float().repeat_interleave(64, 1)
    assert torch.all((qw.dequantize() - deq_bnb).abs() <= 1e-6 * scale)


def test_matches_bitsandbytes_nf4_up_to_fp16_absmax():
    """General float32 weights. lowbit rounds the absmax to fp16 (relative change δ ≤ 2^-11), bitsandbytes
    keeps it fp32. Where the codes agree the outputs differ by |code|·|Δabsmax| ≤ 2^-11·absmax. The code
    itself can differ only where w/absmax lies within ≈2^-11 of a decision midpoint (the scaled value moves by
    ≤ |x|·δ ≤ 2^-11); we allow those (rare: < 1%) and nothing else."""
    W = _weight(32, 512, 8)
    deq_bnb, absmax_bnb = _bnb_nf4(W)
    qw = nf_quantize(W, 4, block_size=64)
    a32 = absmax_bnb.float().repeat_interleave(64, 1)
    deq = qw.dequantize()
    close = (deq - deq_bnb).abs() <= a32 * 2.0**-11 * (1 + 1e-5)
    book = torch.tensor(NF4, dtype=torch.float64)
    mids = (book[1:] + book[:-1]) / 2
    x = W.double() / a32.double()
    near_mid = (x[..., None] - mids).abs().min(-1).values <= 2.0**-10
    assert torch.all(close | near_mid)
    assert (~close).float().mean() < 0.01
