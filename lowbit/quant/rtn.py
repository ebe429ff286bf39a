"""Round-to-nearest (RTN) uniform min-max quantization.

Objective: none beyond the grid — each weight goes to the nearest point of a uniform ``2^bits``-level grid spanning
its (row, group)'s ``[min(w, 0), max(w, 0)]`` (asymmetric) or ``[-max|w|, max|w|]`` (symmetric); see
docs/METHODS.md (Quantization). The optional clip search (as in the GPTQ reference's
``Quantizer.find_params(mse=True)``) shrinks the range by the factor in ``{1, 1 - 1/grid, …, 1 - max_shrink}``
that minimises ``Σ |w - q(w)|^norm``, which helps at 2 bits where a few outliers otherwise waste most of the levels.
"""

from __future__ import annotations

import torch

from .config import QuantConfig, register_quantizer
from .qweight import (
    QuantizedWeight,
    check_bits,
    check_group_size,
    check_weight,
    pad_to_groups,
    params_from_range,
    quantize_codes,
)


def clip_search_params(w: torch.Tensor, bits: int, sym: bool, grid: int = 100, max_shrink: float = 0.2,
                       norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale/zero of ``w`` ``(rows, cols)`` minimising ``Σ|w - q|^norm`` over range shrink factors."""
    xmin0 = w.min(dim=1).values.clamp(max=0)
    xmax0 = w.max(dim=1).values.clamp(min=0)
    best_scale, best_zero = params_from_range(xmin0, xmax0, bits, sym)
    best_err = torch.full_like(xmin0, float("inf"))
    for i in range(int(max_shrink * grid) + 1):
        p = 1 - i / grid
        scale, zero = params_from_range(p * xmin0, p * xmax0, bits, sym)
        q = scale[:, None] * (quantize_codes(w, scale[:, None], zero[:, None], bits) - zero[:, None])
        err = (q - w).abs().pow(norm).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def group_params(w: torch.Tensor, bits: int, sym: bool, clip_search: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale/zero per row of one group's columns ``w`` ``(out, g)`` -> ``(out,), (out,)``."""
    if clip_search:
        return clip_search_params(w, bits, sym)
    return params_from_range(w.min(dim=1).values, w.max(dim=1).values, bits, sym)


def rtn_quantize(W: torch.Tensor, bits: int, group_size: int = -1, sym: bool = False,
                 clip_search: bool = False) -> QuantizedWeight:
    """Quantize ``W`` ``(out, in)`` to ``bits`` with one scale/zero per (row, group of ``group_size`` inputs).

    Returns a :class:`QuantizedWeight` whose ``dequantize()`` is the RTN approximation of ``W``.
    """
    check_bits(bits)
    check_weight(W)
    out, inp = W.shape
    g = check_group_size(inp, group_size)
    Wg = pad_to_groups(W.float(), g)  # a shorter last group is padded with zeros, which change no parameter
    # Treat every (row, group) as one row of the parameter search.
    flat = Wg.reshape(-1, g)
    scale, zero = group_params(flat, bits, sym, clip_search)
    codes = quantize_codes(flat, scale[:, None], zero[:, None], bits).reshape(out, -1)[:, :inp]
    return QuantizedWeight(codes=codes.to(torch.uint8), scales=scale.reshape(out, -1), zeros=zero.reshape(out, -1),
                           bits=bits, group_size=group_size, sym=sym, method="rtn")


@register_quantizer("rtn", needs_calibration=False)
def _rtn(W: torch.Tensor, H: torch.Tensor | None, cfg: QuantConfig) -> QuantizedWeight:
    return rtn_quantize(W, cfg.bits, cfg.group_size, cfg.sym, cfg.clip_search)
