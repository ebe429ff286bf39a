"""GPTQ: accurate post-training quantization for generative pre-trained transformers (Frantar et al., 2022).

Objective, per linear layer: choose quantized ``Q`` minimising the output error ``‖X (W - Q)^T‖_F²`` =
``tr((W - Q) H (W - Q)^T)`` with ``H = X^T X``. GPTQ quantizes one input column at a time and spreads each
column's rounding error over the not-yet-quantized columns through the Cholesky factor of ``H^{-1}``
(Optimal Brain Surgeon updates), lazily in blocks of ``block_size`` columns. docs/METHODS.md (Quantization) lists
the steps; the reference implementation is IST-DASLab/gptq.

Conventions: ``W`` is ``(out, in)``; ``H`` is ``(in, in)`` and any positive multiple of ``X^T X`` gives the same
result (damping is relative to ``mean(diag H)``). Group parameters are chosen on the *current*, error-updated
weights of the group when its first column is reached (``group_params="block-start"``: on the weights as they stood
when the current column block began, without the block's pending updates -- the rule of the reference code and
GPTQModel, whose results it reproduces).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .config import QuantConfig, register_quantizer
from .qweight import QuantizedWeight, check_bits, check_group_size, check_weight, quantize_codes
from .rtn import group_params as group_params_of

log = logging.getLogger(__name__)
GROUP_PARAMS = ("current", "block-start")


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ's own settings (``quant.options``). The default, act-order with static groups, is the most accurate
    contiguous-group GPTQ on real checkpoints (docs/RESULTS.md); ``act_order=false static_groups=false`` is the
    plain GPTQ of the paper."""

    act_order: bool = field(default=True, metadata={"help": "GPTQ: columns by descending diag(H)"})
    static_groups: bool = field(default=True, metadata={
        "help": "GPTQ: group parameters fixed up front on the original weights (contiguous groups with act-order)"})
    group_params: str = field(default="current", metadata={
        "help": "GPTQ without static groups: current (error-updated weights) or block-start (GPTQModel's rule)"})
    damp: float = field(default=0.01, metadata={"help": "GPTQ: damping relative to mean(diag H)"})
    block_size: int = field(default=128, metadata={"help": "GPTQ: columns per lazy-update block"})

    def __post_init__(self) -> None:
        if self.group_params not in GROUP_PARAMS:
            raise ValueError(f"group_params must be one of {list(GROUP_PARAMS)}, got {self.group_params!r}")
        if self.static_groups and self.group_params != "current":
            raise ValueError(f"group_params={self.group_params!r} applies to GPTQ without static groups (static_groups "
                             f"fixes every group's parameters up front); set static_groups=false")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {self.damp}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")


def check_hessian(H: torch.Tensor, in_features: int) -> None:
    """Raise ``ValueError`` unless ``H`` is a finite ``(in, in)`` tensor."""
    if not isinstance(H, torch.Tensor) or H.shape != (in_features, in_features):
        shape = tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
        raise ValueError(f"H must be (in, in) = ({in_features}, {in_features}) (H = X.T @ X over calibration "
                         f"inputs), got {shape}")
    if not torch.isfinite(H).all():
        raise ValueError("H = X^T X holds NaN/Inf: the calibration activations are non-finite (an fp16/bf16 "
                         "overflow, or NaN/Inf in the model's weights or inputs); run calibration in float32 and check "
                         "the model")


def _upper_cholesky_of_inverse(H: torch.Tensor, damp: float) -> torch.Tensor:
    """``U`` upper-triangular with ``U^T U = (H + damp·mean(diag H)·I)^{-1}``; damping grows if H is not PD.
    ``H`` is the caller's scratch copy: the damping is added to its diagonal in place (no identity matrix: at
    LLaMA-2-7B's ``down_proj``, 11008², each ``(in, in)`` float32 matrix is 0.48 GB)."""
    diag0 = torch.diag(H).clone()
    mean_diag = diag0.mean()
    for attempt in range(6):
        d = damp * (10**attempt) if damp > 0 else (0.0 if attempt == 0 else 1e-4 * 10 ** (attempt - 1))
        H.diagonal().copy_(diag0 + d * mean_diag)
        L, info = torch.linalg.cholesky_ex(H)
        if info == 0:
            if attempt:
                log.warning("H was not positive definite with damp=%g; used damp=%g", damp, d)
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U
    raise ValueError(f"H is not positive definite even with damp={d:g}: the calibration set is degenerate "
                     f"(too few tokens?); use more calibration samples or a larger damp")


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int = -1, sym: bool = False,
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128,
                  static_groups: bool = False, clip_search: bool = False, group_params: str = "current"
                  ) -> QuantizedWeight:
    """Quantize ``W`` ``(out, in)`` with GPTQ given ``H`` ``(in, in)``.

    Args:
        bits: 2, 3, 4 or 8. group_size: inputs per scale/zero (``-1``: one group per row).
        sym: symmetric grid. act_order: process columns by descending ``diag(H)`` (records ``g_idx``).
        damp: relative damping ``λ = damp·mean(diag H)``. block_size: columns per lazy-update block.
        static_groups: with act-order, choose every group's parameters up front on the original weights,
            so that groups stay contiguous (``g_idx = c // g``, faster kernels) at a small accuracy cost.
        clip_search: MSE range search for each group's parameters (helps at 2 bits).
        group_params: ``current`` or ``block-start`` (without static groups; see the module docstring).

    Computes in float64 if ``W`` is float64, else float32.
    """
    check_bits(bits)
    check_weight(W)
    out, n = W.shape
    check_hessian(H, n)
    g = check_group_size(n, group_size)
    if not 0 <= damp < 1:
        raise ValueError(f"damp must be in [0, 1) (relative to mean(diag H)), got {damp}")
    if group_params not in GROUP_PARAMS:
        raise ValueError(f"group_params must be 'current' or 'block-start', got {group_params!r}")
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    W = W.detach().to(dtype).clone()
    H = H.detach().to(dtype=dtype, device=W.device)  # the caller's H is never written: copied just below

    dead = torch.diag(H) == 0
    W[:, dead] = 0

    static = None
    if static_groups:
        static = [group_params_of(W[:, s:s + g], bits, sym, clip_search) for s in range(0, n, g)]

    perm = None
    if act_order:
        diag = torch.diag(H).clone()
        diag[dead] = 1  # a dead column counts with H_ii = 1, as set below
        perm = torch.argsort(diag, descending=True, stable=True)
        W = W[:, perm]
        H, dead = H[perm][:, perm], dead[perm]  # a permuted copy
    else:
        H = H.clone()
    H[dead, dead] = 1

    Hinv = _upper_cholesky_of_inverse(H, damp)
    del H
    codes = torch.zeros(out, n, dtype=torch.uint8, device=W.device)
    scales, zeros = [], []
    col_group = torch.empty(n, dtype=torch.long, device=W.device)  # group of each (permuted) column
    scale = zero = None

    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                orig = int(perm[col]) if perm is not None else col
                scale, zero = static[orig // g]
                col_group[col] = orig // g
            else:
                if col % g == 0 and group_params == "block-start":
                    # W holds the block-start weights: in-block updates live in W1 until the block ends.
                    scale, zero = group_params_of(W[:, col:col + g], bits, sym, clip_search)
                    scales.append(scale)
                    zeros.append(zero)
                elif col % g == 0:
                    # The group's current weights: updated in-block columns, then any columns past the block
                    # with this block's pending (lazy) updates applied.
                    cur = W1[:, i:i + g]
                    if i + g > i2 - i1:
                        end = i1 + i + g
                        tail = W[:, i2:end] - Err1[:, :i] @ Hinv[i1:i1 + i, i2:end]
                        cur = torch.cat([cur, tail], dim=1)
                    scale, zero = group_params_of(cur, bits, sym, clip_search)
                    scales.append(scale)
                    zeros.append(zero)
                col_group[col] = col // g
            w = W1[:, i]
            q = quantize_codes(w, scale, zero, bits)
            codes[:, col] = q.to(torch.uint8)
            err = (w - scale * (q - zero)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if static is not None:
        scales_t = torch.stack([s for s, _ in static], dim=1)
        zeros_t = torch.stack([z for _, z in static], dim=1)
    else:
        scales_t = torch.stack(scales, dim=1)
        zeros_t = torch.stack(zeros, dim=1)
    g_idx = None
    if perm is not None:
        invperm = torch.argsort(perm)
        codes = codes[:, invperm]
        if static is None:
            g_idx = col_group[invperm].to(torch.int32)
    return QuantizedWeight(codes=codes, scales=scales_t.float(), zeros=zeros_t.float(), bits=bits,
                           group_size=group_size, g_idx=g_idx, sym=sym, method="gptq")


def output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, relative: bool = True) -> float:
    """``‖X (W - Q)^T‖_F`` from ``H = X^T X`` (divided by ``‖X W^T‖_F`` if ``relative``)."""
    H = H.double()
    err = ref = torch.zeros((), dtype=torch.float64, device=H.device)
    rows = max(1, (1 << 25) // max(1, H.shape[0]))  # row blocks: (rows, in) float64 temporaries of ≤ 256 MB
    for r in range(0, W.shape[0], rows):
        D = (W[r:r + rows] - Q[r:r + rows]).double()
        err = err + ((D @ H) * D).sum()
        if relative:
            Wr = W[r:r + rows].double()
            ref = ref + ((Wr @ H) * Wr).sum()
    err = err.clamp(min=0).sqrt()
    if not relative:
        return float(err)
    return float(err / ref.clamp(min=0).sqrt().clamp(min=1e-30))


def gptq_with(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig) -> QuantizedWeight:
    """:func:`gptq_quantize` with ``cfg``'s common settings and its ``options`` (a :class:`GPTQOptions`, or a
    subclass of it such as MagR+GPTQ's)."""
    o = cfg.options
    return gptq_quantize(W, H, cfg.bits, cfg.group_size, cfg.sym, o.act_order, o.damp, o.block_size,
                         o.static_groups, cfg.clip_search, o.group_params)


@register_quantizer("gptq", needs_calibration=True, options=GPTQOptions)
def _gptq(W: torch.Tensor, H: torch.Tensor | None, cfg: QuantConfig) -> QuantizedWeight:
    return gptq_with(W, H, cfg)
