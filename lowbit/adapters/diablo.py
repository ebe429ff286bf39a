"""DiaBlo: block-diagonal adapters (Gurses et al. 2025, "DiaBlo: Diagonal Blocks Are Sufficient For Finetuning",
arXiv 2506.03230; reference code ziyangjoy/DiaBlo).

Objective: fine-tune only the diagonal blocks of each adapted weight, ``y = base(x) + x @ D`` where ``D``
``(in, out)`` is block-diagonal with ``N`` FP32 blocks ``D_j`` of shape ``(ceil(in/N), ceil(out/N))``,
zero-initialised, no scaling factor. When ``N`` does not divide a dimension the input is zero-padded to
``N·ceil(in/N)`` and the output truncated to ``out``: the last block's padded rows never see data (their gradient
is zero) and its padded columns are discarded. Memory and FLOPs equal LoRA's at equal trainable-parameter count
(``in·out/N`` vs ``r(in+out)``). Saved in PEFT's directory layout with ``peft_type = "LOWBIT_DIABLO"`` and one
tensor per module, ``<module>.diablo_blocks``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer, device_of, peft_targets
from .registry import register_adapter


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


@register_adapter("diablo")
class DiaBloLinear(AdapterLayer):
    """``base`` (``nn.Linear`` or ``QuantLinear``, frozen) plus an FP32 block-diagonal adapter.

    Trainable parameter ``blocks`` ``(N, ceil(in/N), ceil(out/N))``, zero-initialised.
    """

    title = "DiaBlo"
    stored_params = {"diablo_blocks": "blocks"}
    peft_type = "LOWBIT_DIABLO"

    def __init__(self, base: nn.Module, num_blocks: int, dropout: float = 0.0) -> None:
        super().__init__(base, dropout)
        N, bi, bo = block_shape(self.in_features, self.out_features, num_blocks)
        self.num_blocks = N
        self.blocks = nn.Parameter(torch.zeros(N, bi, bo, dtype=torch.float32, device=device_of(base)))

    @classmethod
    def from_config(cls, base: nn.Module, cfg) -> DiaBloLinear:
        return cls(base, cfg.num_blocks, cfg.dropout)

    @classmethod
    def state_shapes(cls, in_features: int, out_features: int, cfg) -> dict[str, tuple[int, ...]]:
        return {"diablo_blocks": block_shape(in_features, out_features, cfg.num_blocks)}

    @classmethod
    def summary(cls, cfg) -> str:
        return f"diablo N={cfg.num_blocks}"

    @classmethod
    def peft_config(cls, cfg, base_name: str | None) -> dict:
        return {"peft_type": cls.peft_type, "task_type": "CAUSAL_LM", "num_blocks": cfg.num_blocks,
                "dropout": cfg.dropout, "target_modules": sorted(cfg.targets), "base_model_name_or_path": base_name}

    @classmethod
    def config_from_peft(cls, peft: dict) -> dict:
        return {"num_blocks": int(peft["num_blocks"]), "dropout": float(peft.get("dropout", 0.0)),
                "targets": peft_targets(peft)}

    def set_blocks(self, blocks: torch.Tensor) -> None:
        """Load ``blocks`` ``(N, ceil(in/N), ceil(out/N))``."""
        if tuple(blocks.shape) != tuple(self.blocks.shape):
            raise ValueError(f"DiaBlo blocks of shape {tuple(blocks.shape)} do not fit this layer "
                             f"({tuple(self.blocks.shape)})")
        with torch.no_grad():
            self.blocks.copy_(blocks)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return diablo_delta(x, self.blocks, self.out_features)

    def delta_weight(self) -> torch.Tensor:
        """The adapter as a weight delta ``(out, in)`` float32 (``D^T``)."""
        return blocks_to_dense(self.blocks, self.in_features, self.out_features).t()

    def extra_repr(self) -> str:
        N, bi, bo = self.blocks.shape
        return f"num_blocks={N}, block=({bi}, {bo})"
