"""LoRA (Hu et al. 2021, arXiv 2106.09685) on a frozen float or quantized base, as in QLoRA / GPTQ-LoRA.

``y = base(x) + s · dropout(x) @ A^T @ B^T`` with ``A`` ``(r, in)``, ``B`` ``(out, r)`` trained in FP32 and
``s = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA, Kalajdzievski 2023). Default init as in PEFT: ``A``
Kaiming-uniform (``a = sqrt(5)``), ``B = 0``, so the wrapped layer starts equal to its base. The adapter branch runs
in float32 whatever the base dtype and is cast back to the base output's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._base import base_shape, base_weight, freeze


class LoRALinear(nn.Module):
    """``base`` (``nn.Linear`` or ``QuantLinear``, frozen) plus a rank-``rank`` FP32 LoRA branch.

    Parameters ``lora_A`` ``(rank, in)`` and ``lora_B`` ``(out, rank)``; ``scaling`` = ``alpha/rank``
    (``alpha/sqrt(rank)`` with ``rslora``).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        super().__init__()
        inp, out = base_shape(base)
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        if rank >= min(inp, out):
            raise ValueError(f"LoRA rank {rank} must be < min(in, out) = {min(inp, out)} for a {out}x{inp} layer "
                             f"(a full-rank adapter is a dense fine-tune); choose a smaller rank")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base = base
        freeze(base)
        self.in_features, self.out_features = inp, out
        self.rank, self.alpha, self.rslora = rank, float(alpha), bool(rslora)
        self.scaling = self.alpha / (math.sqrt(rank) if rslora else rank)
        dev = _device_of(base)
        self.lora_A = nn.Parameter(torch.empty(rank, inp, dtype=torch.float32, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(out, rank, dtype=torch.float32, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def set_factors(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Load ``A`` ``(r, in)`` and ``B`` ``(out, r)`` (already divided by the scaling)."""
        if tuple(A.shape) != tuple(self.lora_A.shape) or tuple(B.shape) != tuple(self.lora_B.shape):
            raise ValueError(f"LoRA factors of shapes A {tuple(A.shape)}, B {tuple(B.shape)} do not fit this layer "
                             f"(A {tuple(self.lora_A.shape)}, B {tuple(self.lora_B.shape)})")
        with torch.no_grad():
            self.lora_A.copy_(A.float())
            self.lora_B.copy_(B.float())

    def delta_weight(self) -> torch.Tensor:
        """``s · B @ A`` ``(out, in)`` float32."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        # FP32 adapter even under bf16/fp16 autocast of the base; PEFT's order of operations
        # (lora_B(lora_A(x)) * s), so PEFT reproduces our logits.
        with torch.autocast(x.device.type, enabled=False):
            z = F.linear(F.linear(self.dropout(x).float(), self.lora_A), self.lora_B) * self.scaling
        return y + z.to(y.dtype)

    def merge(self) -> None:
        """Fold the adapter into a float base weight (``W += s·B A``); not possible for a quantized base."""
        _check_float_base(self.base, "merge")
        if not self.merged:
            with torch.no_grad():
                self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    def unmerge(self) -> None:
        _check_float_base(self.base, "unmerge")
        if self.merged:
            with torch.no_grad():
                self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def as_dense(self) -> torch.Tensor:
        """Effective dense weight ``W_base + s·B A`` ``(out, in)`` float32 (the base dequantised if quantized)."""
        W = base_weight(self.base)
        return W if self.merged else W + self.delta_weight().detach()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, rslora={self.rslora}"


def _device_of(base: nn.Module) -> torch.device:
    for t in list(base.parameters()) + list(base.buffers()):
        return t.device
    return torch.device("cpu")


def _check_float_base(base: nn.Module, what: str) -> None:
    if not isinstance(base, nn.Linear):
        raise TypeError(f"cannot {what} an adapter into a {type(base).__name__} base: only float nn.Linear "
                        f"weights can absorb it (a quantized base would have to be re-quantized)")
