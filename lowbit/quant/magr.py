"""MagR: weight magnitude reduction for enhancing post-training quantization (Zhang et al., NeurIPS 2024,
arXiv 2406.00800; reference code AozhongZhang/MagR).

Objective: ``min_Ŵ ½‖X(Ŵ - W)^T‖_F² + α Σ_rows ‖Ŵ_row‖_∞`` (or ``‖·‖_∞`` per group of ``g`` inputs). Because
LLM activations span a low-dimensional subspace, ``Ŵ`` can move in the null space of ``X`` to shrink each row's
largest magnitudes while the layer output barely changes, so a uniform grid over the smaller range wastes fewer
levels. Solved by proximal gradient with step 1 after rescaling ``H = X^T X`` to spectral norm 1:
``Ŵ ← prox_{α‖·‖∞}(Ŵ - (Ŵ - W) H̃)``, with ``prox_{α‖·‖∞}(v) = v - α·Π_{‖·‖₁≤1}(v/α)`` (Moreau decomposition).
MagR changes only the weights; quantize its output with GPTQ or RTN (``method="magr-gptq"`` / ``"magr-rtn"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import QuantConfig, register_quantizer
from .gptq import GPTQOptions, check_hessian, gptq_with
from .qweight import QuantizedWeight, check_group_size, check_weight, pad_to_groups
from .rtn import rtn_quantize


def project_l1_ball(V: torch.Tensor, radius: float = 1.0) -> torch.Tensor:
    """Euclidean projection of every row of ``V`` ``(rows, d)`` onto ``{x : ‖x‖₁ ≤ radius}`` (sort-based,
    Duchi et al. 2008)."""
    a = V.abs()
    inside = a.sum(dim=1) <= radius
    u = torch.sort(a, dim=1, descending=True).values
    css = u.cumsum(dim=1) - radius
    k = torch.arange(1, V.shape[1] + 1, device=V.device, dtype=V.dtype)
    cond = u - css / k > 0
    # rho = the last index where cond holds (cond is true on a prefix).
    rho = cond.to(torch.int64).sum(dim=1).clamp(min=1)
    theta = css.gather(1, (rho - 1)[:, None]).squeeze(1) / rho.to(V.dtype)
    P = torch.sign(V) * (a - theta[:, None]).clamp(min=0)
    return torch.where(inside[:, None], V, P)


def prox_linf(V: torch.Tensor, alpha: float) -> torch.Tensor:
    """Row-wise proximal operator of ``alpha·‖·‖_∞``: ``v - alpha·Π_{‖·‖₁≤1}(v/alpha)``."""
    return V - alpha * project_l1_ball(V / alpha)


SOLVERS = ("pg", "fista")


def magr_objective(W_hat: torch.Tensor, W: torch.Tensor, H: torch.Tensor, alpha: float,
                   group_size: int = -1, lmax: float | None = None) -> float:
    """The objective :func:`magr` minimises, in its normalised form ``½ tr(D H̃ Dᵀ) + α Σ ‖Ŵ_row/group‖_∞`` with
    ``D = Ŵ - W`` ``(out, in)`` and ``H̃ = H / λ_max(H)``, in float64 (``lmax``: λ_max(H) when already known)."""
    Wh, W0, Hd = W_hat.double(), W.double(), H.double()
    Ht = Hd / (float(torch.linalg.eigvalsh(Hd)[-1]) if lmax is None else lmax)
    D = Wh - W0
    g = check_group_size(W.shape[1], group_size)
    linf = pad_to_groups(Wh, g).reshape(-1, g).abs().amax(1).sum()
    return float(0.5 * torch.einsum("oi,ij,oj->", D, Ht, D) + alpha * linf)


def magr(W: torch.Tensor, H: torch.Tensor, alpha: float = 1e-3, iters: int = 200,
         group_size: int = -1, solver: str = "pg", callback=None) -> torch.Tensor:
    """Pre-process ``W`` ``(out, in)`` with MagR given ``H = X^T X`` ``(in, in)``; returns ``Ŵ`` (same shape,
    float32, or float64 for a float64 ``W``). ``group_size=-1`` penalises each row's ℓ∞ norm; otherwise that of
    each group of ``group_size`` inputs (the paper uses α = 1e-3 per-channel and 1e-4 per-group).

    ``solver="pg"``: the paper's plain proximal gradient (``O(1/k)``). ``"fista"``: the same step from an
    extrapolated point (Beck & Teboulle 2009, ``O(1/k²)``) with gradient-based adaptive restart (O'Donoghue &
    Candès 2015): the momentum is reset whenever it points against the last step, which keeps the objective from
    oscillating; per iteration it costs what a plain step costs, and it reaches a given objective value in far
    fewer iterations. ``callback(k, Ŵ)``, if given, is called after iteration ``k`` (1-based) and stops the
    iterations when it returns ``True``."""
    check_weight(W)
    out, n = W.shape
    # Non-finite H (NaN activations) would turn every weight into NaN, reported later as a corrupt checkpoint.
    check_hessian(H, n)
    if alpha <= 0 or iters < 0:
        raise ValueError(f"need alpha > 0 and iters >= 0, got alpha={alpha}, iters={iters}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown MagR solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    g = check_group_size(n, group_size)
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    W0 = W.detach().to(dtype)
    Hd = H.detach().to(W0)
    # Rescale so that ‖H̃‖₂ = 1: step size 1 is then a valid proximal-gradient step (Lipschitz constant 1).
    lmax = torch.linalg.eigvalsh(Hd.double())[-1].to(dtype)
    if not torch.isfinite(lmax) or lmax <= 0:
        raise ValueError("H has no positive eigenvalue: calibration inputs are all zero")
    Ht = Hd / lmax

    def step(Y: torch.Tensor) -> torch.Tensor:
        V = Y - (Y - W0) @ Ht
        # A shorter last group is padded with zero columns, which the prox leaves at zero.
        return prox_linf(pad_to_groups(V, g).reshape(-1, g), alpha).reshape(out, -1)[:, :n]

    What = W0.clone()
    Y, t = What, 1.0
    for k in range(1, iters + 1):
        if solver == "pg":
            What = step(What)
        else:
            new = step(Y)
            # Restart when the momentum opposes the step just taken: (y - x_new) · (x_new - x_old) > 0.
            if float(((Y - new) * (new - What)).sum()) > 0:
                t = 1.0
            t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
            Y = new + ((t - 1) / t_next) * (new - What)
            What, t = new, t_next
        if callback is not None and callback(k, What):
            break
    return What if dtype == torch.float64 else What.float()


@dataclass(frozen=True)
class MagROptions:
    """MagR's own settings (``quant.options`` of ``magr-rtn``; ``magr-gptq`` adds GPTQ's)."""

    magr_alpha: float | None = field(default=None, metadata={
        "help": "MagR: l-inf penalty (default 1e-3 per channel, 1e-4 per group)"})
    magr_iters: int = field(default=200, metadata={"help": "MagR: proximal iterations"})
    magr_solver: str = field(default="pg", metadata={
        "help": "MagR: pg (the paper's proximal gradient) or fista (accelerated, adaptive restart)"})

    def __post_init__(self) -> None:
        if self.magr_alpha is not None and self.magr_alpha <= 0:
            raise ValueError(f"magr_alpha must be > 0, got {self.magr_alpha}")
        if self.magr_iters < 1:
            raise ValueError(f"magr_iters must be >= 1, got {self.magr_iters}")
        if self.magr_solver not in SOLVERS:
            raise ValueError(f"magr_solver must be one of {list(SOLVERS)}, got {self.magr_solver!r}")


@dataclass(frozen=True)
class MagRGPTQOptions(MagROptions, GPTQOptions):
    """MagR's settings plus GPTQ's (``magr-gptq``)."""

    def __post_init__(self) -> None:
        GPTQOptions.__post_init__(self)
        MagROptions.__post_init__(self)


def _magr(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    o = cfg.options
    alpha = o.magr_alpha if o.magr_alpha is not None else (1e-3 if cfg.group_size == -1 else 1e-4)
    return magr(W, H, alpha=alpha, iters=o.magr_iters, group_size=cfg.group_size, solver=o.magr_solver)


# MagR changes only the weights; the grid comes from GPTQ or RTN (the paper's two pairings).
@register_quantizer("magr-gptq", needs_calibration=True, options=MagRGPTQOptions)
def _magr_gptq(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig) -> QuantizedWeight:
    qw = gptq_with(_magr(W, H, cfg), H, cfg)
    qw.method = "magr-gptq"
    return qw


@register_quantizer("magr-rtn", needs_calibration=True, options=MagROptions)
def _magr_rtn(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig) -> QuantizedWeight:
    qw = rtn_quantize(_magr(W, H, cfg), cfg.bits, cfg.group_size, cfg.sym, cfg.clip_search)
    qw.method = "magr-rtn"
    return qw
