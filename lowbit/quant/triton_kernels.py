"""The Triton kernels behind :mod:`lowbit.quant.triton_dequant` and :mod:`lowbit.quant.triton_matmul`.

Imports ``triton`` at module level, so it is itself imported only lazily, by those two modules, when a CUDA tensor
is processed (or a test under ``TRITON_INTERPRET=1`` asks for it). All kernels read the
:mod:`lowbit.quant.packing` layout through :func:`dequant_tile`: code ``k`` of each 32-code run of a row lives at
bits ``[k·bits, (k+1)·bits)`` of the run's ``bits`` int32 words (3-bit codes 10 and 21 straddle two words), and
``W[r, c] = s[r, g(c)] · (code - z[r, g(c)])`` (uniform grids) or ``s[r, g(c)] · codebook[code]`` (NormalFloat),
with ``g(c) = g_idx[c]`` after act-order and ``c // group_size`` otherwise (a partial last group included).

``UPCAST`` (set only under ``TRITON_INTERPRET=1``, whose ``tl.dot`` returns garbage for bf16 operands in Triton
3.6) multiplies bf16 tiles as exact fp32 values instead: the same products and fp32 accumulation, so the CPU tests
check the arithmetic the GPU performs.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dequant_tile(q_ptr, s_ptr, z_ptr, cb_ptr, gidx_ptr, r, c, mask, words, n_groups, group_size,
                 BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_GIDX: tl.constexpr):
    """fp32 ``W[r, c]`` for broadcastable index tiles ``r`` (rows) and ``c`` (columns); 0 where ``mask`` is off."""
    start = (c % 32) * BITS
    w = (c // 32) * BITS + start // 32
    shift = start % 32
    lo = tl.load(q_ptr + r * words + w, mask=mask, other=0).to(tl.uint32, bitcast=True)
    code = (lo >> shift.to(tl.uint32)) & ((1 << BITS) - 1)
    if BITS == 3:
        spill = (shift + BITS) > 32
        hi = tl.load(q_ptr + r * words + w + 1, mask=mask & spill, other=0).to(tl.uint32, bitcast=True)
        up = tl.where(spill, 32 - shift, 0).to(tl.uint32)
        code = tl.where(spill, code | ((hi << up) & ((1 << BITS) - 1)), code)
    if HAS_GIDX:
        g = tl.load(gidx_ptr + c, mask=mask, other=0)
    else:
        g = c // group_size
    s = tl.load(s_ptr + r * n_groups + g, mask=mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_ptr + r * n_groups + g, mask=mask, other=0.0).to(tl.float32)
        val = (code.to(tl.float32) - z) * s
    else:
        val = tl.load(cb_ptr + code.to(tl.int32), mask=mask, other=0.0).to(tl.float32) * s
    return tl.where(mask, val, 0.0)


@triton.jit
def dequant_kernel(q_ptr, s_ptr, z_ptr, cb_ptr, gidx_ptr, out_ptr, rows, cols, words, n_groups, group_size,
                   BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_GIDX: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """One ``BLOCK_R x BLOCK_C`` tile of the dense weight, rounded once from fp32 to the output dtype."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    mask = (r < rows) & (c < cols)
    val = dequant_tile(q_ptr, s_ptr, z_ptr, cb_ptr, gidx_ptr, r, c, mask, words, n_groups, group_size,
                       BITS, HAS_ZEROS, HAS_GIDX)
    tl.store(out_ptr + r * cols + c, val.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dot_acc(acc, a, w, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ w`` with the fp32 tile ``w`` rounded to ``a``'s dtype first (as the dense path multiplies)."""
    if UPCAST:  # exact: a product of two bf16 values is exact in fp32
        return acc + tl.dot(a.to(tl.float32), w.to(a.dtype).to(tl.float32), input_precision="ieee")
    elif IEEE:
        return acc + tl.dot(a, w.to(a.dtype), input_precision="ieee")
    else:
        return acc + tl.dot(a, w.to(a.dtype))


@triton.jit
def matmul_wt_kernel(x_ptr, q_ptr, s_ptr, z_ptr, cb_ptr, gidx_ptr, y_ptr, M, N, K, words, n_groups, group_size,
                     BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_GIDX: tl.constexpr, IEEE: tl.constexpr,
                     UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``y[M, N] = x[M, K] @ W[N, K]^T`` with each ``(BLOCK_K, BLOCK_N)`` tile of ``W^T`` dequantised in registers,
    rounded to ``x``'s dtype (as the dense path multiplies), accumulated in fp32."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kr = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + m * K + kr[None, :], mask=(m < M) & (kr[None, :] < K), other=0.0)
        kc = kr[:, None]
        wt = dequant_tile(q_ptr, s_ptr, z_ptr, cb_ptr, gidx_ptr, n, kc, (n < N) & (kc < K), words, n_groups,
                          group_size, BITS, HAS_ZEROS, HAS_GIDX)
        acc = dot_acc(acc, xt, wt, IEEE, UPCAST)
    tl.store(y_ptr + m * N + n, acc.to(y_ptr.dtype.element_ty), mask=(m < M) & (n < N))


@triton.jit
def matmul_w_kernel(g_ptr, q_ptr, s_ptr, z_ptr, cb_ptr, gidx_ptr, out_ptr, M, N, K, words, n_groups, group_size,
                    BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_GIDX: tl.constexpr, IEEE: tl.constexpr,
                    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out[M, K] = g[M, N] @ W[N, K]`` (the input gradient of ``x @ W^T``), ``W`` tiles dequantised in
    registers."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        nr = n0 + tl.arange(0, BLOCK_N)
        gt = tl.load(g_ptr + m * N + nr[None, :], mask=(m < M) & (nr[None, :] < N), other=0.0)
        nc = nr[:, None]
        wt = dequant_tile(q_ptr, s_ptr, z_ptr, cb_ptr, gidx_ptr, nc, k, (nc < N) & (k < K), words, n_groups,
                          group_size, BITS, HAS_ZEROS, HAS_GIDX)
        acc = dot_acc(acc, gt, wt, IEEE, UPCAST)
    tl.store(out_ptr + m * K + k, acc.to(out_ptr.dtype.element_ty), mask=(m < M) & (k < K))
