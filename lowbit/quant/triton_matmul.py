"""Fused low-bit matmuls in Triton: ``x @ W^T`` (forward) and ``g @ W`` (input gradient) with ``W``'s tiles
dequantised from the packed codes in registers, never written to memory as a dense weight.

The alternative :mod:`lowbit.quant.triton_dequant` writes the dense weight once and hands it to cuBLAS; which one is
faster depends on the GPU and the token count (a fused kernel saves the weight's round trip through memory, cuBLAS
has better tiling), so ``QuantLinear`` uses the fused kernels only when ``LOWBIT_TRITON_FUSED=1`` and
``benchmarks/bench_gpu.py`` times both. Each ``W`` tile is rounded to the activations' dtype before the
product, exactly as the dense path multiplies a weight dequantised into that dtype; products accumulate in fp32
(fp32 inputs use IEEE fp32 products, not TF32). Correctness is tested on the CPU under ``TRITON_INTERPRET=1``
(``tests/quant/test_triton_matmul.py``).
"""

from __future__ import annotations

import os

import torch

BLOCK_M, BLOCK_N, BLOCK_K = 32, 64, 64


def _check(bits: int, zeros: torch.Tensor | None, codebook: torch.Tensor | None) -> None:
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be one of 2, 3, 4, 8, got {bits}")
    if (zeros is None) == (codebook is None):
        raise ValueError("give exactly one of zeros (uniform grid) and codebook (NormalFloat)")


def _launch(kernel, a: torch.Tensor, out_cols: int, col_block: int, qweight, scales, zeros, codebook, g_idx,
            bits: int, in_features: int, group_size: int) -> torch.Tensor:
    """Run ``kernel`` over ``a`` (..., features) -> (..., out_cols); the grid tiles ``out_cols`` by ``col_block``."""
    import triton

    a2 = a.reshape(-1, a.shape[-1]).contiguous()
    M = a2.shape[0]
    out = torch.empty(M, out_cols, dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out.reshape(*a.shape[:-1], out_cols)
    N = qweight.shape[0]
    s = scales.contiguous()
    dummy = s  # an unused pointer argument still needs a tensor
    z = zeros.contiguous() if zeros is not None else dummy
    cb = codebook.float().contiguous() if codebook is not None else dummy
    gi = g_idx.to(torch.int32).contiguous() if g_idx is not None else dummy
    g = in_features if group_size == -1 else group_size
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(out_cols, col_block))
    kernel[grid](a2, qweight.contiguous(), s, z, cb, gi, out, M, N, in_features, qweight.shape[1], s.shape[1], g,
                 BITS=bits, HAS_ZEROS=zeros is not None, HAS_GIDX=g_idx is not None,
                 IEEE=a.dtype == torch.float32,
                 UPCAST=a.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
                 BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out.reshape(*a.shape[:-1], out_cols)


def triton_matmul_wt(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     codebook: torch.Tensor | None, g_idx: torch.Tensor | None, bits: int, in_features: int,
                     group_size: int) -> torch.Tensor:
    """``x @ W^T``: ``x`` ``(..., in)`` -> ``(..., out)`` in ``x``'s dtype, ``W`` ``(out, in)`` given by the
    packed storage (the arguments of ``dequantize_packed``)."""
    _check(bits, zeros, codebook)
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {in_features}")
    from .triton_kernels import matmul_wt_kernel

    return _launch(matmul_wt_kernel, x, qweight.shape[0], BLOCK_N, qweight, scales, zeros, codebook,
                   g_idx, bits, in_features, group_size)


def triton_matmul_w(g: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    codebook: torch.Tensor | None, g_idx: torch.Tensor | None, bits: int, in_features: int,
                    group_size: int) -> torch.Tensor:
    """``g @ W``: ``g`` ``(..., out)`` -> ``(..., in)`` in ``g``'s dtype (the input gradient of ``x @ W^T``)."""
    _check(bits, zeros, codebook)
    if g.shape[-1] != qweight.shape[0]:
        raise ValueError(f"g has {g.shape[-1]} features, the weight {qweight.shape[0]} rows")
    from .triton_kernels import matmul_w_kernel

    return _launch(matmul_w_kernel, g, in_features, BLOCK_K, qweight, scales, zeros, codebook, g_idx, bits,
                   in_features, group_size)
