"""DiaBlo: block-diagonal adapters (arXiv 2506.03230, 2025; reference code ziyangjoy/DiaBlo).

``y = base(x) + x @ D`` where ``D`` ``(in, out)`` is block-diagonal with ``N`` FP32 blocks ``D_j`` of shape
``(ceil(in/N), ceil(out/N))``, zero-initialised, no scaling factor. When ``N`` does not divide a dimension the
input is zero-padded to ``N·ceil(in/N)`` and the output truncated to ``out``: the last block's padded rows never
see data (their gradient is zero) and its padded columns are discarded. Memory and FLOPs equal LoRA's at equal
trainable-parameter count (``in·out/N`` vs ``r(in+out)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._base import base_shape, base_weight, freeze
from .lora import _check_float_base, _device_of


def block_shape(in_features: int, out_features: int, num_blocks: int) -> tuple[int, int, int]:
    """``(N, ceil(in/N), ceil(out/N))`` after validating ``num_blocks`` against the layer."""
    if not isinstance(num_blocks, int) or num_blocks <= 0:
        raise ValueError(f"DiaBlo num_blocks must be a positive integer, got {num_blocks!r}")
    if num_blocks > min(in_features, out_features):
        raise ValueError(f"DiaBlo num_blocks {num_blocks} exceeds min(in, out) = {min(in_features, out_features)} "
                         f"of a {out_features}x{in_features} layer; use at most {min(in_features, out_features)}")
    return num_blocks, math.ceil(in_features / num_blocks), math.ceil(out_features / num_blocks)


def diablo_delta(x: torch.Tensor, blocks: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x @ block_diag(blocks)[:in, :out]`` for ``x`` ``(..., in)`` and ``blocks`` ``(N, bi, bo)`` -> ``(..., out)``,
    computed per block (never materialising the dense matrix), in ``blocks``' dtype."""
    N, bi, bo = blocks.shape
    inp = x.shape[-1]
    lead = x.shape[:-1]
    x = x.reshape(-1, inp).to(blocks.dtype)
    if N * bi != inp:
        x = F.pad(x, (0, N * bi - inp))
    # (T, N, bi) -> (N, T, bi) @ (N, bi, bo) -> (N, T, bo) -> (T, N·bo)
    y = torch.bmm(x.view(-1, N, bi).transpose(0, 1), blocks).transpose(0, 1).reshape(-1, N * bo)
    if N * bo != out_features:
        y = y[:, :out_features]
    return y.reshape(*lead, out_features)


def blocks_to_dense(blocks: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """``block_diag(blocks)[:in, :out]`` ``(in, out)`` — the dense matrix ``D`` of ``y = x @ D``."""
    return torch.block_diag(*blocks.unbind(0))[:in_features, :out_features]


def dense_to_blocks(D: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """The ``(N, bi, bo)`` diagonal blocks of a dense ``(in, out)`` matrix (zero-padded as in the forward)."""
    inp, out = D.shape
    N, bi, bo = block_shape(inp, out, num_blocks)
    Dp = F.pad(D, (0, N * bo - out, 0, N * bi - inp))
    return torch.stack([Dp[j * bi:(j + 1) * bi, j * bo:(j + 1) * bo] for j in range(N)])


class DiaBloLinear(nn.Module):
    """``base`` (``nn.Linear`` or ``QuantLinear``, frozen) plus an FP32 block-diagonal adapter.

    Trainable parameter ``blocks`` ``(N, ceil(in/N), ceil(out/N))``, zero-initialised.
    """

    def __init__(self, base: nn.Module, num_blocks: int, dropout: float = 0.0) -> None:
        super().__init__()
        inp, out = base_shape(base)
        N, bi, bo = block_shape(inp, out, num_blocks)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base = base
        freeze(base)
        self.in_features, self.out_features, self.num_blocks = inp, out, N
        self.blocks = nn.Parameter(torch.zeros(N, bi, bo, dtype=torch.float32, device=_device_of(base)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        with torch.autocast(x.device.type, enabled=False):  # FP32 adapter even under autocast of the base
            z = diablo_delta(self.dropout(x).float(), self.blocks, self.out_features)
        return y + z.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The adapter as a weight delta ``(out, in)`` float32 (``D^T``)."""
        return blocks_to_dense(self.blocks, self.in_features, self.out_features).t()

    def as_dense(self) -> torch.Tensor:
        """Effective dense weight ``W_base + D^T`` ``(out, in)`` float32 (the base dequantised if quantized)."""
        W = base_weight(self.base)
        return W if self.merged else W + self.delta_weight().detach()

    def merge(self) -> None:
        """``W += block_diag(D)[:in, :out]^T`` into a float base; not possible for a quantized base."""
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

    def extra_repr(self) -> str:
        N, bi, bo = self.blocks.shape
        return f"num_blocks={N}, block=({bi}, {bo})"
