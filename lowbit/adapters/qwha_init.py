"""The QWHA initialisation (Jeon et al. 2025, arXiv 2509.17428: AdaAlloc and value refinement; reference
vantaa89/qwha, ``src/init/initialize.py``): the sparse Walsh–Hadamard adapter of :mod:`lowbit.adapters.qwha` starts
as the best correction of the quantization error it can hold.

Objective: with ``E = W − Q`` ``(out, in)`` (full-precision minus dequantised weight), calibration inputs ``X`` and
``G = XᵀX + λI`` (``λ = damp·mean(diag XᵀX)``), choose the support — ``k_i`` positions in row ``i``, ``Σ k_i = N`` —
and the coefficients ``c`` of ``ΔW = P·U`` minimising ``Σ_i (E_i − ΔW_i) G (E_i − ΔW_i)ᵀ``
(``= ‖X (E − ΔW)ᵀ‖_F² + λ‖E − ΔW‖_F²``, CLoQ's weighted objective). ``U = H/√in`` is orthonormal, so row ``i`` of
``E`` is ``E_i = Σ_j C_ij u_j`` with ``C = E Uᵀ`` and ``u_j`` the rows of ``U``.

1. Budget (AdaAlloc): ``k_i ∝ ‖E_i‖`` — the floor of the proportional share, capped at ``in``; what the floors and
   the cap leave is spread over the rows below the cap, evenly, the last units to the rows with the smallest
   ``k_i``, so ``Σ k_i = N`` exactly (the reference's ``‖H E_i‖ = √in·‖E_i‖`` with its exponent 1).
2. Support: in row ``i``, the ``k_i`` basis vectors with the largest ``C_ij² · u_j G u_jᵀ`` — the output energy
   ``‖X (C_ij u_j)ᵀ‖²`` (plus damping) of ``E_i``'s component along ``u_j``; the reference's
   ``‖R H_j‖² · (H E_i)_j²`` with ``RᵀR = G``, the same up to a constant factor.
3. Values: the least-squares solution on that support, ``M_SS c = b_S`` with ``M = U G Uᵀ`` and ``b = E G Uᵀ``
   (the normal equations of the objective restricted to the support: unique for ``λ > 0``; with ``damp = 0`` and a
   singular ``M_SS``, the minimum-norm solution).

Cost: ``M`` and ``E G`` are built once with the fast transform (``O(in²·log in)`` and ``O(out·in²)``); holding ``G``,
``M`` and two transform copies in float64 needs about four ``in × in`` float64 matrices (≈ 4 GB for ``in = 11008``);
then one ``k_i × k_i`` Cholesky solve per row, batched over the rows of equal ``k_i`` (a Python loop over single
rows spent most of the init in per-call overhead).

lowbit differs from the released code in: the damping (``adapter.init_options.damp``, default 0.01 as for CLoQ; the
reference adds ``1e-4·mean(diag)``); the budget's remainder (the reference spreads it once over the rows whose floor
did not pass the cap, which can lift a row already at the cap above ``in``; lowbit spreads it over the rows below the
cap until it is used up); and the calibration pass — the reference collects ``XᵀX`` of every layer on the float model,
lowbit inside its sequential quantization pass, where later layers see the quantized, already adapted earlier ones
(as for CLoQ).
"""

from __future__ import annotations

import torch

from .hadamard import walsh_hadamard
from .linalg import DampOptions, check_init_inputs, damped
from .qwha import QWHALinear, qwha_budget
from .registry import register_init


def allocate_budget(weights: torch.Tensor, n: int, cap: int) -> torch.Tensor:
    """``k`` ``(rows,)`` int64 with ``Σ k = n``, ``0 ≤ k ≤ cap`` and ``k_i ∝ weights_i`` (AdaAlloc, step 1 above);
    zero weights everywhere share ``n`` evenly."""
    rows = weights.numel()
    if not 0 <= n <= rows * cap:
        raise ValueError(f"a budget of {n} does not fit {rows} rows of at most {cap}")
    w = weights.detach().double().cpu().clamp(min=0)
    w = w if float(w.sum()) > 0 else torch.ones_like(w)
    k = torch.floor(n * w / w.sum()).to(torch.int64).clamp(max=cap)
    while int(k.sum()) > n:  # a share rounded up in float64
        k[int(torch.argmax(k))] -= 1
    while (rest := n - int(k.sum())) > 0:
        open_rows = torch.nonzero(k < cap).flatten()
        if rest >= open_rows.numel():
            k[open_rows] = (k[open_rows] + rest // open_rows.numel()).clamp(max=cap)
        else:  # the last units to the smallest rows (ties: the first rows)
            order = torch.argsort(k[open_rows], stable=True)[:rest]
            k[open_rows[order]] += 1
    return k


def basis_gram(G: torch.Tensor) -> torch.Tensor:
    """``M = U G Uᵀ`` ``(in, in)`` for a symmetric ``G`` ``(in, in)``: ``M_jl = u_j G u_lᵀ``."""
    GUt = walsh_hadamard(G)  # rows of G transformed: G Uᵀ
    return walsh_hadamard(GUt.t()).t()  # U (G Uᵀ) = ((G Uᵀ)ᵀ Uᵀ)ᵀ


def _solve(M: torch.Tensor, b: torch.Tensor, rtol: float = 1e-10) -> torch.Tensor:
    """``c`` ``(g, k)`` with ``M[r] c[r] = b[r]`` for a batch ``M`` ``(g, k, k)`` (symmetric PSD), ``b`` ``(g, k)``.

    A system that Cholesky rejects, or whose pivots fall below ``rtol`` of the largest (singular up to rounding,
    which Cholesky can pass with garbage), gets the minimum-norm least-squares solution with singular values below
    ``rtol`` of the largest treated as zero (as :func:`~lowbit.adapters.linalg.gram_root` does)."""
    L, info = torch.linalg.cholesky_ex(M)
    piv = L.diagonal(dim1=-2, dim2=-1).square()
    bad = torch.nonzero((info != 0) | (piv.amin(-1) <= rtol * piv.amax(-1))).flatten()
    c = torch.cholesky_solve(b[..., None], L)[..., 0]
    if bad.numel():
        sol = torch.linalg.lstsq(M[bad].cpu(), b[bad, :, None].cpu(), rcond=rtol, driver="gelsd").solution
        c[bad] = sol[..., 0].to(c)
    return c


def _supports(scores: torch.Tensor, M: torch.Tensor, B: torch.Tensor, k: torch.Tensor, chunk: int = 1 << 24):
    """``(rows, columns, values)`` per group of rows with the same ``k_i``: the ``k_i`` largest scores of each row
    (columns ascending) and the least-squares values there; batched, at most ``chunk`` entries of ``M_SS`` at once."""
    for kk in torch.unique(k).tolist():
        if kk == 0:
            continue
        group = torch.nonzero(k == kk).flatten().to(scores.device)
        step = max(1, chunk // (kk * kk))
        for rows in group.split(step):
            S = torch.topk(scores[rows], kk, dim=1).indices.sort(dim=1).values  # (g, k)
            c = _solve(M[S[:, :, None], S[:, None, :]], torch.gather(B[rows], 1, S))
            yield rows[:, None].expand_as(S), S, c


def qwha_init_spectrum(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, rank: int, damp: float = 0.01
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """QWHA's support and coefficients for ``W``, ``Q`` ``(out, in)`` and ``H = XᵀX`` ``(in, in)``.

    Returns ``positions`` ``(2, N)`` int64 (rows, columns; sorted row-major) and ``coefficients`` ``(N,)`` in ``W``'s
    float dtype (float32 for half precision; computed in float64), ``N = rank·(in + out)``, such that
    ``ΔW = P·U`` is the least-squares correction of ``E = W − Q`` on its support (module docstring).
    """
    check_init_inputs(W, Q, H)
    out, inp = W.shape
    n = qwha_budget(inp, out, rank)
    E = W.double() - Q.double()
    G = damped(H, damp)
    C = walsh_hadamard(E)  # (out, in): E's coefficients in the orthonormal basis
    M = basis_gram(G)
    B = walsh_hadamard(E @ G)  # (out, in): b_i = E_i G Uᵀ
    del G
    scores = C.square() * M.diagonal()[None, :]
    k = allocate_budget(E.norm(dim=1), n, inp)
    rows, cols, vals = zip(*((r.reshape(-1), S.reshape(-1), c.reshape(-1)) for r, S, c in _supports(scores, M, B, k)))
    positions = torch.stack([torch.cat(rows), torch.cat(cols)]).cpu()
    dtype = W.dtype if W.is_floating_point() and W.dtype != torch.float16 and W.dtype != torch.bfloat16 \
        else torch.float32
    return positions, torch.cat(vals).to(dtype).cpu()


@register_init("qwha", adapters=("qwha",), needs_calibration=True, needs_float_weights=True, options=DampOptions)
def _qwha(wrapper: QWHALinear, W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, cfg, options: DampOptions) -> None:
    """Inside the calibration pass: the adapter's positions and coefficients become the correction above."""
    wrapper.set_spectrum(*qwha_init_spectrum(W, Q, H, cfg.rank, damp=options.damp))
