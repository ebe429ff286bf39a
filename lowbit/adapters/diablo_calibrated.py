"""Calibrated DiaBlo initialisation (new in lowbit): the idea of CLoQ (Deng et al. 2025, arXiv 2501.18475) applied
to the block-diagonal adapters of DiaBlo (Gurses et al. 2025, arXiv 2506.03230).

Objective: with ``E = W - Q`` and calibration inputs ``X`` (``H = X^T X``), choose the block-diagonal ``D``
``(in, out)`` of a :class:`~lowbit.adapters.DiaBloLinear` minimising ``‖X (E^T - D)‖_F``. Output block ``j`` only
reads input block ``j``, so the problem decouples into ``N`` least-squares problems with the closed form
``D_j = (H_jj + λI)^{-1} [H E^T]_jj``. With ``H = I`` this is the diagonal blocks of ``E^T``. One
``(in, in)·(in, out)`` matmul plus ``N`` small solves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .diablo import DiaBloLinear, block_shape, blocks_to_dense
from .linalg import DampOptions, check_init_inputs, damped
from .registry import register_init


def diablo_calibrated_init(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, num_blocks: int, damp: float = 0.01
                           ) -> torch.Tensor:
    """Blocks ``(N, ceil(in/N), ceil(out/N))`` for ``W``, ``Q`` ``(out, in)``, ``H`` ``(in, in)``, float32.

    Padded rows/columns (when ``N`` does not divide a dimension) are zero. A singular ``H_jj`` (``damp=0``, dead
    inputs) is solved by least squares (minimum-norm solution), so the result stays finite.
    """
    check_init_inputs(W, Q, H)
    out, inp = W.shape
    N, bi, bo = block_shape(inp, out, num_blocks)
    Hd = damped(H, damp)
    HEt = H.double() @ (W.double() - Q.double()).T  # (in, out); λ only regularises the solve, as in the formula
    HEt = F.pad(HEt, (0, N * bo - out, 0, N * bi - inp))
    blocks = torch.zeros(N, bi, bo, dtype=torch.float64, device=W.device)
    for j in range(N):
        r0, r1 = j * bi, min((j + 1) * bi, inp)
        if r1 <= r0:
            continue  # a block made only of padding sees no input
        Hjj = Hd[r0:r1, r0:r1]
        rhs = HEt[r0:r1, j * bo:(j + 1) * bo]
        try:
            L = torch.linalg.cholesky(Hjj)
            blocks[j, : r1 - r0] = torch.cholesky_solve(rhs, L)
        except RuntimeError:
            blocks[j, : r1 - r0] = torch.linalg.lstsq(Hjj, rhs, driver="gelsd").solution
    return blocks.float()


def diablo_objective(E: torch.Tensor, H: torch.Tensor, blocks: torch.Tensor) -> float:
    """``‖X (E^T - D)‖_F²`` for the dense ``D`` of ``blocks``, in float64."""
    out, inp = E.shape
    Dt = blocks_to_dense(blocks.double(), inp, out).T
    R = E.double() - Dt
    return float(((R @ H.double()) * R).sum())


@register_init("calibrated", adapters=("diablo",), needs_calibration=True, needs_float_weights=True,
               options=DampOptions)
def _calibrated(wrapper: DiaBloLinear, W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, cfg,
                options: DampOptions) -> None:
    """Inside the calibration pass: the blocks become the closed form above."""
    wrapper.set_blocks(diablo_calibrated_init(W, Q, H, wrapper.num_blocks, damp=options.damp))
