"""A single-pass Triton kernel that dequantises packed codes into a dense weight (used on CUDA before cuBLAS).

Reads the :mod:`lowbit.quant.packing` layout directly: code ``k`` of each 32-code run of a row lives at bits
``[k·bits, (k+1)·bits)`` of the run's ``bits`` int32 words (3-bit codes 10 and 21 straddle two words). Each program
writes a ``BLOCK_R x BLOCK_C`` tile of ``W[r, c] = s[r, g(c)] · (code - z[r, g(c)])`` (uniform grids) or
``s[r, g(c)] · codebook[code]`` (NormalFloat), computed in fp32 and rounded once to the output dtype, with
``g(c) = g_idx[c]`` after act-order and ``c // group_size`` otherwise (a partial last group included). One read of
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


_KERNEL = None


def _kernel():
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def dequant(q_ptr, s_ptr, z_ptr, cb_ptr, gidx_ptr, out_ptr, rows, cols, words, n_groups, group_size,
                BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_GIDX: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_C: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
        mask = (r < rows) & (c < cols)
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
            g = tl.load(gidx_ptr + c, mask=c < cols, other=0)
        else:
            g = c // group_size
        s = tl.load(s_ptr + r * n_groups + g, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + r * n_groups + g, mask=mask, other=0.0).to(tl.float32)
            val = (code.to(tl.float32) - z) * s
        else:
            val = tl.load(cb_ptr + code.to(tl.int32), mask=mask, other=0.0).to(tl.float32) * s
        tl.store(out_ptr + r * cols + c, val.to(out_ptr.dtype.element_ty), mask=mask)

    _KERNEL = dequant
    return dequant


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
    _kernel()[grid](q, s, zeros.contiguous() if zeros is not None else dummy,
                    codebook.float().contiguous() if codebook is not None else dummy, gi, out, rows, in_features,
                    q.shape[1], s.shape[1], g, BITS=bits, HAS_ZEROS=zeros is not None, HAS_GIDX=g_idx is not None,
                    BLOCK_R=block_r, BLOCK_C=block_c)
    return out
