"""LoftQ: LoRA-fine-tuning-aware quantization (Li et al. 2023, arXiv 2310.08659).

Objective: ``min_{Q, A, B} ‖W - Q - B A‖_F`` with ``Q`` on the quantizer's grid and ``B A`` of rank ``r``, by
alternating ``T`` times (METHODS.md §2): ``Q = deq(quant(W - B A))``; SVD ``W - Q = U S V^T``;
``B = U_r S_r^{1/2}``, ``A = S_r^{1/2} V_r^T`` (``B A = 0`` before the first step). Quantizers are lowbit's own:
NormalFloat (``"nf"``, NF4/NF2 as in the paper) or uniform min-max (``"uniform"``, RTN asymmetric).
"""

from __future__ import annotations

import torch

from ..quant.nf import nf_quantize
from ..quant.qweight import QuantizedWeight, check_weight
from ..quant.rtn import rtn_quantize

QUANTIZERS = ("nf", "uniform")


def _quantize(W: torch.Tensor, bits: int, quantizer: str, group_size: int) -> QuantizedWeight:
    if quantizer == "nf":
        return nf_quantize(W, bits, block_size=group_size)
    return rtn_quantize(W, bits, group_size=group_size)


def loftq_init(W: torch.Tensor, bits: int, rank: int, iters: int = 5, quantizer: str = "nf", group_size: int = 64,
               scaling: float = 1.0, history: list[float] | None = None
               ) -> tuple[QuantizedWeight, torch.Tensor, torch.Tensor]:
    """LoftQ for ``W`` ``(out, in)``.

    Returns the quantized weight, ``A`` ``(rank, in)`` and ``B`` ``(out, rank)`` (float32) with
    ``Q + scaling · B A ≈ W``: both factors are divided by ``sqrt(scaling)`` so that a LoRA layer with that scaling
    reproduces the approximation. If ``history`` is a list, ``‖W - Q_t - B_t A_t‖_F`` of every iteration is
    appended to it.
    """
    check_weight(W)
    out, inp = W.shape
    if quantizer not in QUANTIZERS:
        raise ValueError(f"unknown LoftQ quantizer {quantizer!r}; choose one of {QUANTIZERS}")
    if quantizer == "nf" and bits not in (2, 4):
        raise ValueError(f"the NormalFloat quantizer supports bits 2 and 4, got {bits}; use quantizer='uniform'")
    if not isinstance(rank, int) or not 0 < rank < min(out, inp):
        raise ValueError(f"rank must be an integer in [1, min(out, in) = {min(out, inp)}), got {rank!r}")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive integer, got {iters!r}")
    if scaling <= 0:
        raise ValueError(f"LoRA scaling must be > 0, got {scaling}")
    W = W.float()
    lowrank = torch.zeros_like(W)
    for _ in range(iters):
        qw = _quantize(W - lowrank, bits, quantizer, group_size)
        E = W - qw.dequantize().float()
        U, S, Vh = torch.linalg.svd(E.double(), full_matrices=False)
        root = S[:rank].sqrt()
        B = (U[:, :rank] * root[None, :]).float()
        A = (root[:, None] * Vh[:rank]).float()
        lowrank = B @ A
        if history is not None:
            history.append(float((E - lowrank).norm()))
    s = scaling ** 0.5
    return qw, (A / s).contiguous(), (B / s).contiguous()
