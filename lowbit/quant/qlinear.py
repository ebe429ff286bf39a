"""`QuantLinear`: a frozen linear layer stored as packed low-bit codes, dequantised on the fly.

Storage (module buffers, nothing else): ``qweight`` int32 ``(out, ceil(in/32)·bits)`` (layout in
:mod:`lowbit.quant.packing`), ``scales`` fp16 ``(out, G)``, and either ``zeros`` fp16 ``(out, G)`` (uniform codes)
or ``codebook`` fp32 ``(2^bits,)`` (NormalFloat); ``g_idx`` int32 ``(in,)`` only after act-order; optional
``bias``. That is ``out·in·bits/8 + 4·out·in/g + O(out + in)`` bytes — no float copy of the weight exists
between calls.

The forward pass dequantises into the compute dtype (the input's, or ``compute_dtype`` if set), multiplies, and
frees the dense weight. The weight is frozen; gradients flow to the input only, and the backward pass
dequantises again rather than keeping the dense weight alive in the autograd graph (the bitsandbytes approach),
so activation memory during adapter training does not include any full-precision base weights.

Dequantisation speed: on the common layout (no act-order ``g_idx``, ``in`` a multiple of 32, groups a multiple
of 8 inputs, little-endian host) the weight is rebuilt straight from the packed bytes: byte-sized integer ops
split the codes (:func:`~lowbit.quant.packing.code_planes`), one conversion writes them into the output, and two
in-place float ops apply zero and scale (a 256-entry byte table for NormalFloat codebooks). That is a handful of
passes over the weight and a single allocation (on CPU, a fresh large tensor costs a page fault per 4 KiB on first
touch, as much as the arithmetic); the result is bit-identical to the reference ``s * (codes - z)``. Other layouts
take the general path (:func:`~lowbit.quant.packing.unpack`, then the same formula).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .packing import CODES_PER_UNIT, code_planes, pack, packed_bytes, packed_size, unpack
from .qweight import QuantizedWeight, check_bits, default_group_index, num_groups


def _fast_stream(qweight: torch.Tensor, g_idx: torch.Tensor | None, bits: int, in_features: int,
                 g: int) -> torch.Tensor | None:
    """The packed bytes ``(out, in·bits/8)`` when the byte-level path applies, else ``None``."""
    if g_idx is not None or in_features % 32 or in_features % g or g % CODES_PER_UNIT[bits] or qweight.numel() == 0:
        return None
    return packed_bytes(qweight)


_WORD = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # bytes -> an integer dtype of that width


def _fill(buf: torch.Tensor, stream: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
          codebook: torch.Tensor | None, bits: int, g: int) -> None:
    """Write the dense weight whose packed bytes are ``stream`` ``(r, c·bits/8)`` into ``buf`` ``(r, c)``
    (contiguous, in the compute dtype); ``scales``/``zeros`` ``(r, c/g)``.

    Same arithmetic as the reference ``s * (codes - z)`` / ``s * codebook[codes]`` in ``buf.dtype``, so the
    result is bit-identical to it.
    """
    r, c = buf.shape
    k = CODES_PER_UNIT[bits]
    G = c // g
    if zeros is None and 8 % bits == 0:
        # Codebook: one gather from a 256-entry table of the k values each byte holds, in stream order.
        byte = torch.arange(256, device=buf.device)
        cb = codebook.to(buf.dtype)
        table = torch.stack([cb[(byte >> (j * bits)) & ((1 << bits) - 1)] for j in range(k)], dim=1)  # (256, k)
        idx = stream.reshape(-1).to(torch.int32)
        word = _WORD.get(k * buf.element_size())
        if word is not None:
            # A byte's k values as one 2/4/8-byte word: a 1-D gather is ~5x faster on CPU than gathering rows of
            # k floats (0.15 vs 0.79 ms for a 1536 x 576 NF4 weight), and copies the same bits.
            torch.index_select(table.contiguous().view(word).reshape(-1), 0, idx, out=buf.view(-1).view(word))
        else:
            torch.index_select(table, 0, idx, out=buf.view(-1, k))
        buf.view(r, G, g).mul_(scales.to(buf.dtype)[..., None])
        return
    W = buf.view(r, G, g // k, k)  # W[..., j] = codes at positions ≡ j (mod k)
    planes = [p.reshape(r, G, g // k) for p in code_planes(stream, bits)]
    s = scales.to(buf.dtype)[..., None]  # (r, G, 1)
    if (zeros is not None and buf.device.type == "cpu" and buf.dtype in (torch.float32, torch.float64)
            and bool((zeros == zeros.round()).all())):
        # One fused pass per plane: c·s - z·s. With fp16 s and integer codes/zeros both products are exact in fp32
        # (≤ 8 + 11 and 11 + 11 significant bits), so the sum is (c - z)·s rounded once, as in the reference.
        # (CPU only: the integrality check would make a GPU wait for the host.)
        zs = -(zeros.to(buf.dtype) * scales.to(buf.dtype))[..., None]
        for j, p in enumerate(planes):
            torch.addcmul(zs, p, s, out=W[..., j])
        return
    cb = None if zeros is not None else codebook.to(buf.dtype)  # (a 3-bit codebook)
    for j, p in enumerate(planes):
        W[..., j].copy_(p if cb is None else cb[p.long()])
    if zeros is not None:
        buf.view(r, G, g).sub_(zeros.to(buf.dtype)[..., None])
    buf.view(r, G, g).mul_(s)


def dequantize_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      codebook: torch.Tensor | None, g_idx: torch.Tensor | None, bits: int, in_features: int,
                      group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``(out, in)`` weight in ``dtype`` from packed storage. On CUDA with ``triton`` installed, one pass of
    the Triton kernel (:mod:`lowbit.quant.triton_dequant`; ``LOWBIT_TRITON=0`` turns it off)."""
    if qweight.is_cuda and _use_triton():
        from .triton_dequant import triton_dequantize

        return triton_dequantize(qweight, scales, zeros, codebook, g_idx, bits, in_features, group_size, dtype)
    g = in_features if group_size == -1 else group_size
    stream = _fast_stream(qweight, g_idx, bits, in_features, g)
    if stream is not None:
        W = torch.empty(qweight.shape[0], in_features, dtype=dtype, device=qweight.device)
        _fill(W, stream, scales, zeros, codebook, bits, g)
        return W
    codes = unpack(qweight, bits, in_features)  # (out, in) uint8
    out = codes.shape[0]
    if g_idx is None and in_features % g:  # a shorter last group: index the groups column by column
        g_idx = default_group_index(in_features, g, qweight.device)
    if g_idx is None:
        codes = codes.view(out, in_features // g, g)
        s = scales.to(dtype)[..., None]
        if zeros is not None:
            W = s * (codes.to(dtype) - zeros.to(dtype)[..., None])
        else:
            W = s * codebook.to(dtype)[codes.long()]
        return W.reshape(out, in_features)
    gi = g_idx.long()
    s = scales.to(dtype)[:, gi]
    if zeros is not None:
        return s * (codes.to(dtype) - zeros.to(dtype)[:, gi])
    return s * codebook.to(dtype)[codes.long()]


_TRITON: bool | None = None


def _use_triton() -> bool:
    global _TRITON
    if _TRITON is None:
        import os

        from .triton_dequant import available

        _TRITON = os.environ.get("LOWBIT_TRITON", "1") != "0" and available()
    return _TRITON


_FUSED: bool | None = None


def _use_fused(x: torch.Tensor) -> bool:
    """The fused Triton matmuls (:mod:`lowbit.quant.triton_matmul`) for a CUDA input, when ``LOWBIT_TRITON_FUSED=1``
    (off by default: whether they beat dequantise + cuBLAS is measured per GPU by ``benchmarks/bench_gpu.py``)."""
    global _FUSED
    if not x.is_cuda:
        return False
    if _FUSED is None:
        import os

        _FUSED = os.environ.get("LOWBIT_TRITON_FUSED", "0") == "1"
        if _FUSED and not _use_triton():  # asked for by name: never a silent switch to the other path
            raise RuntimeError("LOWBIT_TRITON_FUSED=1 needs triton (pip install triton) and LOWBIT_TRITON not set "
                               "to 0; unset LOWBIT_TRITON_FUSED to use dequantise + GEMM")
    return _FUSED


@contextlib.contextmanager
def fused_matmul(enabled: bool = True) -> Iterator[None]:
    """Within the block, CUDA ``QuantLinear`` layers use (or, with ``enabled=False``, do not use) the fused Triton
    matmuls, whatever ``LOWBIT_TRITON_FUSED`` says; for benchmarks and tests that compare both paths."""
    global _FUSED
    if enabled and not _use_triton():
        raise RuntimeError("fused_matmul(True) needs triton (pip install triton) and LOWBIT_TRITON not set to 0")
    before, _FUSED = _FUSED, enabled
    try:
        yield
    finally:
        _FUSED = before


def _matmul_wt(x: torch.Tensor, module: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
    """``x @ W^T`` in ``dtype``: fused on CUDA when enabled, else the dense weight and one GEMM."""
    if _use_fused(x):
        from .triton_matmul import triton_matmul_wt

        return triton_matmul_wt(x, *module.packed_args())
    return F.linear(x, module.dequantize(dtype))


class _DequantMatmul(torch.autograd.Function):
    """``y = x @ W^T`` with ``W`` rebuilt from packed storage in forward and again in backward."""

    @staticmethod
    def forward(ctx, x, module: QuantLinear, dtype: torch.dtype):  # type: ignore[override]
        ctx.module = module
        ctx.dtype = dtype
        return _matmul_wt(x, module, dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None
        g = grad_out.to(ctx.dtype)
        if _use_fused(g):
            from .triton_matmul import triton_matmul_w

            return triton_matmul_w(g, *ctx.module.packed_args()), None, None
        return g @ ctx.module.dequantize(ctx.dtype), None, None


class QuantLinear(nn.Module):
    """Frozen ``y = x @ W_hat^T + b`` with ``W_hat`` held as packed ``bits``-bit codes.

    Build it with :meth:`from_quantized`; the constructor allocates empty storage of the right shapes (used when
    loading a saved quantized model).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = -1, bias: bool = False,
                 codebook: bool = False, act_order: bool = False, compute_dtype: torch.dtype | None = None,
                 bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        check_bits(bits)
        n_groups = num_groups(in_features, group_size)  # the last group may be shorter
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.compute_dtype = compute_dtype
        self.register_buffer("qweight", torch.zeros(out_features, packed_size(in_features, bits), dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(out_features, n_groups, dtype=torch.float16))
        if codebook:
            self.register_buffer("codebook", torch.zeros(2**bits, dtype=torch.float32))
            self.zeros = None
        else:
            self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.float16))
            self.codebook = None
        if act_order:
            self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        else:
            self.g_idx = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype))
        else:
            self.bias = None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                       compute_dtype: torch.dtype | None = None) -> QuantLinear:
        out, inp = qw.shape
        # An act-order g_idx may leave groups in any order; storage then needs the explicit g_idx.
        act_order = qw.g_idx is not None
        m = cls(inp, out, qw.bits, qw.group_size, bias=bias is not None, codebook=qw.codebook is not None,
                act_order=act_order, compute_dtype=compute_dtype,
                bias_dtype=bias.dtype if bias is not None else torch.float32)
        dev = qw.codes.device
        m.to(dev)
        m.qweight.copy_(pack(qw.codes, qw.bits))
        m.scales.copy_(qw.scales.to(torch.float16))
        if qw.zeros is not None:
            m.zeros.copy_(qw.zeros.to(torch.float16))
        else:
            m.codebook.copy_(qw.codebook.float())
        if act_order:
            m.g_idx.copy_(qw.g_idx.to(torch.int32))
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    def to_quantized(self) -> QuantizedWeight:
        """The stored weight as a :class:`QuantizedWeight` (codes unpacked)."""
        return QuantizedWeight(codes=unpack(self.qweight, self.bits, self.in_features), scales=self.scales.float(),
                               zeros=None if self.zeros is None else self.zeros.float(), bits=self.bits,
                               group_size=self.group_size,
                               g_idx=None if self.g_idx is None else self.g_idx.long(),
                               codebook=None if self.codebook is None else self.codebook.float())

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.scales.dtype

    def packed_args(self) -> tuple:
        """``(qweight, scales, zeros, codebook, g_idx, bits, in_features, group_size)``: the packed storage as the
        dequantisation functions take it."""
        return (self.qweight, self.scales, self.zeros, self.codebook, self.g_idx, self.bits, self.in_features,
                self.group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``(out, in)`` weight in ``dtype`` (float32 by default)."""
        return dequantize_packed(*self.packed_args(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear expects inputs with last dimension {self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        dtype = self.compute_dtype or (x.dtype if x.is_floating_point() else torch.float32)
        xc = x.to(dtype)
        if xc.requires_grad and torch.is_grad_enabled():
            y = _DequantMatmul.apply(xc, self, dtype)
        else:
            y = _matmul_wt(xc, self, dtype)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.to(x.dtype) if x.is_floating_point() else y

    def extra_repr(self) -> str:
        kind = "nf" if self.codebook is not None else "uniform"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, {kind}, act_order={self.g_idx is not None}, "
                f"bias={self.bias is not None}")
