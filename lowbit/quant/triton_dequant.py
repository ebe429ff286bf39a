"""A single-pass Triton kernel that dequantises packed codes into a dense weight (used on CUDA before cuBLAS).

Reads the :mod:`lowbit.quant.packing` layout directly (the kernel is
:func:`lowbit.quant.triton_kernels.dequant_kernel`): each program writes a ``BLOCK_R x BLOCK_C`` tile of
``W[r, c] = s[r, g(c)] · (code - z[r, g(c)])`` (uniform grids) or ``s[r, g(c)] · codebook[code]`` (NormalFloat),
computed in fp32 and rounded once to the output dtype, with ``g(c) = g_idx[c]`` after act-order and
``c // group_size`` otherwise (a partial last group included). One read of
the packed bytes and one write of the weight: the torch path (:func:`~lowbit.quant.qlinear.dequantize_packed`)
makes several passes, which on a GPU cost as much as the matmul at short sequence lengths.

Optional: ``triton`` is imported only here, only when a CUDA tensor is dequantised (or a test asks for it). On a
CPU it runs under Triton's interpreter (``TRITON_INTERPRET=1``), which is how the tests check it bit for bit.
"""

from __future__ import annotations

import torch


def available() -> bool:
    """``True`` when ``triton`` imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      codebook: torch.Tensor | None, g_idx: torch.Tensor | None, bits: int, in_features: int,
                      group_size: int, dtype: torch.dtype = torch.bfloat16, block_r: int = 16,
                      block_c: int = 128) -> torch.Tensor:
    """Dense ``(out, in)`` weight in ``dtype`` from packed storage (the arguments of ``dequantize_packed``):
    ``qweight`` int32 ``(out, ceil(in/32)·bits)``, ``scales``/``zeros`` ``(out, G)``, ``codebook`` ``(2^bits,)``,
    ``g_idx`` int ``(in,)`` or ``None``."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be one of 2, 3, 4, 8, got {bits}")
    if (zeros is None) == (codebook is None):
        raise ValueError("give exactly one of zeros (uniform grid) and codebook (NormalFloat)")
    import triton

    rows = qweight.shape[0]
    g = in_features if group_size == -1 else group_size
    out = torch.empty(rows, in_features, dtype=dtype, device=qweight.device)
    if out.numel() == 0:
        return out
    q = qweight.contiguous()
    s = scales.contiguous()
    dummy = s  # an unused pointer argument still needs a tensor
    gi = g_idx.to(torch.int32).contiguous() if g_idx is not None else dummy
    grid = (triton.cdiv(rows, block_r), triton.cdiv(in_features, block_c))
    from .triton_kernels import dequant_kernel

    dequant_kernel[grid](q, s, zeros.contiguous() if zeros is not None else dummy,
                    codebook.float().contiguous() if codebook is not None else dummy, gi, out, rows, in_features,
                    q.shape[1], s.shape[1], g, BITS=bits, HAS_ZEROS=zeros is not None, HAS_GIDX=g_idx is not None,
                    BLOCK_R=block_r, BLOCK_C=block_c)
    return out
