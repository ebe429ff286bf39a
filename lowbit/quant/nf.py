"""NormalFloat quantization (QLoRA NF4, Dettmers et al. 2023; LoftQ NF2, Li et al. 2023).

Objective: information-theoretically even use of the levels for normally distributed weights — each block of
``block_size`` consecutive inputs of a row is scaled by its absmax into ``[-1, 1]`` and every weight goes to the
nearest value of a fixed codebook (the quantiles of N(0, 1), normalised, with an exact zero). NF4 is the
16-value bitsandbytes table; NF2 is LoftQ's ``[-1, 0, 0.3379, 1]``. The absmax is stored fp16 (double
quantization of the absmax, an 8-bit second level in QLoRA, is not applied: it saves 0.37 bits/weight at
block 64 but changes nothing in the represented weight beyond fp16 rounding).
"""

from __future__ import annotations

import torch

from .config import QuantConfig, register_quantizer
from .qweight import QuantizedWeight, check_bits, check_group_size, check_weight, pad_to_groups, round_fp16

NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
NF2_CODEBOOK = (-1.0, 0.0, 0.3379, 1.0)


def nf_codebook(bits: int) -> torch.Tensor:
    check_bits(bits, (2, 4))
    return torch.tensor(NF4_CODEBOOK if bits == 4 else NF2_CODEBOOK, dtype=torch.float32)


def nf_quantize(W: torch.Tensor, bits: int, block_size: int = 64) -> QuantizedWeight:
    """Quantize ``W`` ``(out, in)`` to NF4 (``bits=4``) or NF2 (``bits=2``), one fp16 absmax per block of
    ``block_size`` inputs of each row (``-1``: per row). Returns a codebook :class:`QuantizedWeight`."""
    check_bits(bits, (2, 4))
    check_weight(W)
    out, n = W.shape
    g = check_group_size(n, block_size)
    book = nf_codebook(bits).to(W.device)
    Wb = pad_to_groups(W.detach().float(), g).reshape(out, -1, g)  # zero padding leaves every absmax as it is
    absmax = round_fp16(Wb.abs().amax(dim=2)).clamp(min=2.0**-24)  # (out, G)
    x = Wb / absmax[..., None]
    # Nearest codebook value (ties go to the lower code, as with bitsandbytes' midpoint thresholds).
    codes = (x[..., None] - book).abs().argmin(dim=-1).reshape(out, -1)[:, :n]
    return QuantizedWeight(codes=codes.to(torch.uint8), scales=absmax, zeros=None, bits=bits,
                           group_size=block_size, codebook=book, method=f"nf{bits}")


# Each block is scaled by its absmax onto the fixed codebook: there is no range to search.
@register_quantizer("nf", needs_calibration=False, bits=(2, 4), needs_groups=True, ignores=("clip_search",))
def _nf(W: torch.Tensor, H: torch.Tensor | None, cfg: QuantConfig) -> QuantizedWeight:
    return nf_quantize(W, cfg.bits, cfg.group_size)
