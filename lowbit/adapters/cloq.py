"""CLoQ: calibrated LoRA initialisation for quantized LLMs (Deng et al. 2025, "CLoQ: Enhancing Fine-Tuning of
Quantized LLMs via Calibrated LoRA Initialization", arXiv 2501.18475).

Objective: with ``E = W - Q`` (full-precision minus dequantised weight) and calibration inputs ``X``, choose
rank-``r`` ``B A`` minimising ``‖X (E - B A)^T‖_F``. Closed form: with ``R^T R = H = X^T X`` and the SVD
``R E^T = U Σ V^T``, ``(B A)^T = R^{-1} U_r Σ_r V_r^T``; the optimum is ``Σ_{i>r} σ_i²``. The objective fixes only
the product; the natural split ``A = Σ_r^{1/2} U_r^T R^{-T}``, ``B = V_r Σ_r^{1/2}`` depends on the scale of ``H``:
``H → kH`` multiplies ``A`` by ``k^{-1/4}`` and ``B`` by ``k^{1/4}`` (``H = X^T X`` over 16K tokens made ``B`` ~10×
larger than ``A`` on the tiny model), and Adam's per-parameter step size then moves ``B A`` ~10× faster along ``A``
than a zero-init LoRA moves: CLoQ-initialised training stalled at loss ~1.0 (2-bit, lr 5e-3) where GPTQ-LoRA
reached 0.2. So each rank-one component is rescaled to equal norms, ``‖B_{:,i}‖ = ‖A_{i,:}‖`` — the product, hence
the objective, is unchanged, and the split no longer depends on the scale of ``H``. ``H`` is damped by
``λ = damp·mean(diag H)``; eigen-directions of (undamped, ``damp=0``) ``H`` that carry no energy get a
pseudo-inverse, so a rank-deficient ``H`` gives a finite answer that leaves those unseen directions at zero.
"""

from __future__ import annotations

import torch

from .linalg import DampOptions, check_init_inputs, damped, gram_root
from .lora import LoRALinear, check_rank
from .registry import register_init


def cloq_init(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, rank: int, damp: float = 0.01
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """CLoQ factors for ``W``, ``Q`` ``(out, in)`` and ``H = X^T X`` ``(in, in)``.

    Returns ``A`` ``(rank, in)`` and ``B`` ``(out, rank)`` in ``W``'s float dtype (computed in float64) with
    ``B @ A`` ≈ ``W - Q`` under the ``H`` metric; no LoRA scaling is applied (divide both by ``sqrt(s)``).
    """
    check_init_inputs(W, Q, H)
    out, inp = W.shape
    check_rank(rank, inp, out)
    E = W.double() - Q.double()
    R, R_pinv = gram_root(damped(H, damp))
    U, S, Vh = torch.linalg.svd(R @ E.T, full_matrices=False)
    root = S[:rank].sqrt()
    A = (R_pinv @ U[:, :rank] * root[None, :]).T
    B = Vh[:rank].T * root[None, :]
    # Equal norms per component (see the module docstring); a zero component stays zero.
    na, nb = A.norm(dim=1), B.norm(dim=0)
    c = torch.where((na > 0) & (nb > 0), (na / nb.clamp_min(1e-300)).sqrt(), torch.ones_like(na))
    A, B = A / c[:, None], B * c[None, :]
    dtype = W.dtype if W.is_floating_point() and W.dtype != torch.float16 else torch.float32
    return A.to(dtype).contiguous(), B.to(dtype).contiguous()


def cloq_objective(E: torch.Tensor, H: torch.Tensor, delta: torch.Tensor) -> float:
    """``‖X (E - delta)^T‖_F² = tr((E - Δ) H (E - Δ)^T)`` for ``(out, in)`` ``E`` and ``delta``, in float64."""
    D = E.double() - delta.double()
    return float(((D @ H.double()) * D).sum())


@register_init("cloq", adapters=("lora",), needs_calibration=True, needs_float_weights=True, options=DampOptions)
def _cloq(wrapper: LoRALinear, W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, cfg, options: DampOptions) -> None:
    """Inside the calibration pass: the LoRA delta ``s·B A`` becomes CLoQ's ``B A``."""
    wrapper.set_delta(*cloq_init(W, Q, H, cfg.rank, damp=options.damp))
