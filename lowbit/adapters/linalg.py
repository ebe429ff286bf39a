"""Square roots of a calibration Gram matrix ``H = X^T X`` shared by the calibrated initialisations."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class DampOptions:
    """The options of the closed-form calibrated inits (``cloq``, ``calibrated``, ``qwha``):
    ``adapter.init_options.damp``, the relative damping ``λ = damp·mean(diag H)`` of ``H`` in their solves."""

    damp: float = field(default=0.01, metadata={"help": "relative damping of H in the closed form"})

    def __post_init__(self) -> None:
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {self.damp}")


def check_init_inputs(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor | None) -> None:
    if W.dim() != 2 or W.shape != Q.shape:
        raise ValueError(f"W and Q must be (out, in) matrices of the same shape, got {tuple(W.shape)} and "
                         f"{tuple(Q.shape)}")
    if H is not None and (H.dim() != 2 or H.shape[0] != H.shape[1] or H.shape[0] != W.shape[1]):
        raise ValueError(f"H must be (in, in) = ({W.shape[1]}, {W.shape[1]}) for W of shape {tuple(W.shape)}, got "
                         f"{tuple(H.shape)}")
    for name, t in (("W", W), ("Q", Q), ("H", H)):
        if t is not None and not torch.isfinite(t).all():
            raise ValueError(f"{name} holds NaN/Inf values")


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + λI`` with ``λ = damp · mean(diag H)`` in float64 (the GPTQ / CLoQ convention)."""
    if not 0 <= damp < 1:
        raise ValueError(f"damp must be in [0, 1), got {damp}")
    H = H.double()
    lam = damp * H.diagonal().mean().clamp(min=0)
    return H + lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)


def gram_root(H: torch.Tensor, rtol: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, R_pinv)`` with ``R^T R = H`` for a symmetric PSD float64 ``H`` ``(n, n)``: ``R = Λ^{1/2} U^T`` from
    ``eigh``; eigenvalues below ``rtol · λ_max`` count as zero, so ``R_pinv`` is a truncated pseudo-inverse and a
    rank-deficient ``H`` still gives finite factors."""
    evals, U = torch.linalg.eigh(H)
    keep = evals > rtol * evals.max().clamp(min=0)
    sq = evals.clamp(min=0).sqrt()
    R = sq[:, None] * U.T
    inv = torch.where(keep, 1.0 / torch.where(keep, sq, torch.ones_like(sq)), torch.zeros_like(sq))
    return R, U * inv[None, :]
