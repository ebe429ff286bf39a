"""Learnable weight clipping (LWC) of OmniQuant (Shao et al. 2023, "OmniQuant: Omnidirectionally Calibrated
Quantization for Large Language Models", arXiv 2308.13137), in the form ApiQ-bw trains it (Liao et al. 2024,
arXiv 2402.05147).

Objective: a uniform asymmetric per-(row, group) quantizer whose range ``[xmin·σ(β), xmax·σ(γ)]`` shrinks the
group's range ``[min(min w, 0), max(max w, 0)]`` by learnable logits ``γ, β``, trained through straight-through
rounding to minimise a downstream loss (ApiQ-bw: the block output MSE). :func:`lwc_quantize` is the differentiable
fake quantization, :func:`lwc_to_quantized` stores exactly what it computes, :class:`LwcLoRALinear` is the training
stand-in for one linear (clipping plus optional LoRA).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.qweight import QuantizedWeight, check_bits, check_group_size, params_from_range, quantize_codes

# Reference initial value of the clipping logits γ, β: σ(4) ≈ 0.982, i.e. almost min-max.
LWC_INIT = 4.0


def dividing_group_size(in_features: int, group_size: int) -> int:
    """The effective group size, which must divide ``in_features`` here: the learnable clipping keeps one
    ``(gamma, beta)`` pair per full group (a shorter last group, which the other quantizers accept, is refused)."""
    g = check_group_size(in_features, group_size)
    if in_features % g:
        divisors = [d for d in (32, 64, 128, 256) if in_features % d == 0]
        raise ValueError(f"group_size {group_size} does not divide in_features {in_features}; ApiQ-bw's learnable "
                         f"clipping needs full groups: use one of {divisors or [in_features]} or -1 (per row)")
    return g


def _clipped_groups(W: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, group_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W`` ``(out, in)`` -> grouped weight ``(out, G, g)`` and the clipped range ``xmin, xmax`` ``(out, G)``."""
    if W.dim() != 2:
        raise ValueError(f"W must be a 2-D (out, in) tensor, got shape {tuple(W.shape)}")
    out, inp = W.shape
    g = dividing_group_size(inp, group_size)
    n_groups = inp // g
    for name, t in (("gamma", gamma), ("beta", beta)):
        if tuple(t.shape) != (out, n_groups):
            raise ValueError(f"{name} must have shape ({out}, {n_groups}) for W {tuple(W.shape)} and group_size "
                             f"{group_size}, got {tuple(t.shape)}")
    Wg = W.float().reshape(out, n_groups, g)
    # The base weight is frozen: its range is a constant, only the clipping factors learn. Detaching also makes
    # the gradient w.r.t. W exactly the straight-through identity (no extra term through min/max).
    Wd = Wg.detach()
    xmin = Wd.amin(dim=-1).clamp(max=0) * torch.sigmoid(beta.float())
    xmax = Wd.amax(dim=-1).clamp(min=0) * torch.sigmoid(gamma.float())
    return Wg, xmin, xmax


def lwc_quantize(W: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, bits: int, group_size: int
                 ) -> torch.Tensor:
    """Differentiable fake quantization of ``W`` ``(out, in)`` with learnable clipping; returns ``(out, in)`` fp32.

    Per (row, group): range ``[min(min w, 0)·σ(β), max(max w, 0)·σ(γ)]``, scale and integer zero point from
    :func:`~lowbit.quant.qweight.params_from_range` (so the scale is fp16-representable, as in every lowbit
    quantizer), ``W_hat = scale·(clamp(round(w/scale) + zero, 0, 2^bits-1) - zero)``.

    Args:
        W: ``(out, in)`` weight; treated as a constant for the range, gradient w.r.t. ``W`` is straight-through
            (1 where the code is not clamped, 0 where it is).
        gamma, beta: ``(out, in // group_size)`` clipping logits of the upper/lower bound (``(out, 1)`` for
            ``group_size=-1``).
        bits: 2, 3, 4 or 8. group_size: inputs per group, or -1 for one group per row.
    Gradients: straight-through for ``round``; ``γ, β`` receive the gradient through the scale (the zero point is
    rounded without STE, as in the reference).
    """
    check_bits(bits)
    Wg, xmin, xmax = _clipped_groups(W, gamma, beta, group_size)
    maxq = 2**bits - 1
    scale_q, zero = params_from_range(xmin.detach(), xmax.detach(), bits, sym=False)
    # The forward value is params_from_range's fp16-representable scale, but the gradient comes from the exact
    # fp32 range: back-propagating through the fp16 cast would flush small gradients to zero.
    raw = (xmax - xmin) / maxq
    scale = (scale_q + (raw - raw.detach()))[..., None]  # (out, G, 1)
    zero = zero[..., None]
    x = Wg / scale
    # Written as "value + (x - x)" so the forward value is bit-identical to quantize_codes' torch.round.
    codes = torch.clamp(torch.round(x).detach() + (x - x.detach()) + zero, 0, maxq)
    return (scale * (codes - zero)).reshape(W.shape)


@torch.no_grad()
def lwc_to_quantized(W: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, bits: int, group_size: int
                     ) -> QuantizedWeight:
    """The :class:`QuantizedWeight` (codes ``(out, in)``, scales/zeros ``(out, G)``) whose ``dequantize()`` equals
    :func:`lwc_quantize` ``(W, gamma, beta, bits, group_size)``; built like :func:`~lowbit.quant.rtn.rtn_quantize`
    from the clipped range instead of the min-max range."""
    check_bits(bits)
    Wg, xmin, xmax = _clipped_groups(W, gamma, beta, group_size)
    scale, zero = params_from_range(xmin, xmax, bits, sym=False)
    codes = quantize_codes(Wg, scale[..., None], zero[..., None], bits).reshape(W.shape)
    return QuantizedWeight(codes=codes.to(torch.uint8), scales=scale, zeros=zero, bits=bits, group_size=group_size,
                           sym=False, method="apiq")


class LwcLoRALinear(nn.Module):
    """Training stand-in for one ``nn.Linear``: ``x @ (Q(W; γ, β) + s·B@A)^T + b`` with ``s = α/r``, or
    ``x @ Q(W; γ, β)^T + b`` (learnable clipping only, ``lora_A = lora_B = None``) when ``lora`` is False.

    After :meth:`freeze` it computes with the final quantized weight and fixed LoRA merged into one matrix.
    """

    def __init__(self, linear: nn.Linear, bits: int, group_size: int, rank: int, alpha: float,
                 generator: torch.Generator, lora: bool = True) -> None:
        super().__init__()
        out, inp = linear.weight.shape
        dev = linear.weight.device
        n_groups = inp // dividing_group_size(inp, group_size)
        self.bits, self.group_size, self.scaling = bits, group_size, alpha / rank
        self.register_buffer("weight", linear.weight.detach().float().clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.gamma = nn.Parameter(torch.full((out, n_groups), LWC_INIT, device=dev))
        self.beta = nn.Parameter(torch.full((out, n_groups), LWC_INIT, device=dev))
        self.frozen: torch.Tensor | None = None
        if not lora:
            # Clipping only; nothing is drawn from the generator.
            self.lora_A = self.lora_B = None
            return
        A = torch.empty(rank, inp)
        # PEFT / nn.Linear initialisation (bound 1/sqrt(in)); drawn on the CPU so the seed means the same everywhere.
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(A.to(dev))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out, rank, device=dev))  # (out, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen is not None:
            return F.linear(x, self.frozen, self.bias)
        Wq = lwc_quantize(self.weight, self.gamma, self.beta, self.bits, self.group_size)
        y = F.linear(x, Wq, self.bias)
        if self.lora_A is None:
            return y
        return y + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)

    @torch.no_grad()
    def freeze(self) -> tuple[QuantizedWeight, torch.Tensor | None, torch.Tensor | None]:
        qw = lwc_to_quantized(self.weight, self.gamma, self.beta, self.bits, self.group_size)
        if self.lora_A is None:
            self.frozen = qw.dequantize()
            return qw, None, None
        A, B = self.lora_A.detach().clone(), self.lora_B.detach().clone()
        self.frozen = qw.dequantize() + self.scaling * (B @ A)
        return qw, A, B
