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

Speed (CPU): on the common layout (no act-order ``g_idx``, ``in`` a multiple of 32, groups a multiple of 8
inputs) the weight is rebuilt straight from the packed bytes — byte-sized integer ops, one conversion into the
output and two in-place float ops — and, on CPU, in slices of about ``_CHUNK_ELEMS`` weights that are multiplied
as soon as they are built (rows of ``W`` in the forward pass, column blocks in the backward pass). A slice
buffer is reused, so the dense ``(out, in)`` weight is never allocated: freshly allocated large tensors cost a
page fault per 4 KiB on first touch, more than the dequantisation itself. Results equal a full dequantise
followed by one matmul up to fp32 summation order.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .packing import CODES_PER_UNIT, code_planes, pack, packed_bytes, packed_size, unpack
from .qweight import QuantizedWeight, check_bits, check_group_size

# Weights per dequantised slice in the CPU matmul (2^22 = 16 MiB in fp32; a 4096×4096 layer takes 4 slices).
# Smaller slices stay in cache but each costs a few more parallel regions, which get expensive when other
# processes compete for the cores.
_CHUNK_ELEMS = 1 << 22


def _fast_stream(qweight: torch.Tensor, g_idx: torch.Tensor | None, bits: int, in_features: int,
                 g: int) -> torch.Tensor | None:
    """The packed bytes ``(out, in·bits/8)`` when the byte-level path applies, else ``None``."""
    if g_idx is not None or in_features % 32 or g % CODES_PER_UNIT[bits] or qweight.numel() == 0:
        return None
    return packed_bytes(qweight)


def _fill(buf: torch.Tensor, stream: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
          codebook: torch.Tensor | None, bits: int, g: int) -> None:
    """Write the dense weight of a block whose packed bytes are ``stream`` ``(r, c·bits/8)`` into ``buf``
    ``(r, c)`` (contiguous, in the compute dtype); ``scales``/``zeros`` ``(r, c/g)`` are the block's groups.

    Same arithmetic as the reference ``s * (codes - z)`` / ``s * codebook[codes]`` in ``buf.dtype``, so the
    result is bit-identical to it.
    """
    r, c = buf.shape
    planes = code_planes(stream, bits)
    k = len(planes)
    G = c // g
    W = buf.view(r, G, g // k, k)  # W[..., j] = codes at positions ≡ j (mod k)
    if zeros is not None:
        for j, p in enumerate(planes):
            W[..., j].copy_(p.reshape(r, G, g // k))
        buf.view(r, G, g).sub_(zeros.to(buf.dtype)[..., None]).mul_(scales.to(buf.dtype)[..., None])
    else:
        cb = codebook.to(buf.dtype)
        for j, p in enumerate(planes):
            W[..., j].copy_(cb[p.reshape(r, G, g // k).long()])
        buf.view(r, G, g).mul_(scales.to(buf.dtype)[..., None])


def dequantize_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      codebook: torch.Tensor | None, g_idx: torch.Tensor | None, bits: int, in_features: int,
                      group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``(out, in)`` weight in ``dtype`` from packed storage."""
    g = in_features if group_size == -1 else group_size
    stream = _fast_stream(qweight, g_idx, bits, in_features, g)
    if stream is not None:
        W = torch.empty(qweight.shape[0], in_features, dtype=dtype, device=qweight.device)
        _fill(W, stream, scales, zeros, codebook, bits, g)
        return W
    codes = unpack(qweight, bits, in_features)  # (out, in) uint8
    out = codes.shape[0]
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


def _sliced(module: QuantLinear, x: torch.Tensor) -> torch.Tensor | None:
    """The packed bytes if ``module`` should be multiplied slice by slice for an input on ``x``'s device.

    Not under autocast: ``mm(out=...)`` bypasses it, and the plain matmul keeps autocast's dtype choice."""
    if (x.device.type != "cpu" or module.out_features * module.in_features <= _CHUNK_ELEMS
            or torch.is_autocast_enabled(x.device.type)):
        return None
    return _fast_stream(module.qweight, module.g_idx, module.bits, module.in_features, module._group)


def _matmul_wt(x: torch.Tensor, m: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
    """``x @ W^T`` for 2-D ``x`` ``(T, in)`` in ``dtype`` -> ``(T, out)``."""
    stream = _sliced(m, x)
    if stream is None:
        return x @ m.dequantize(dtype).t()
    out_f, in_f, g = m.out_features, m.in_features, m._group
    rows = max(1, _CHUNK_ELEMS // in_f)
    y = torch.empty(x.shape[0], out_f, dtype=dtype, device=x.device)
    buf = torch.empty(min(rows, out_f) * in_f, dtype=dtype, device=x.device)
    for r0 in range(0, out_f, rows):
        r1 = min(r0 + rows, out_f)
        Wr = buf[: (r1 - r0) * in_f].view(r1 - r0, in_f)
        _fill(Wr, stream[r0:r1], m.scales[r0:r1], None if m.zeros is None else m.zeros[r0:r1], m.codebook,
              m.bits, g)
        torch.mm(x, Wr.t(), out=y[:, r0:r1])
    return y


def _matmul_w(gy: torch.Tensor, m: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
    """``gy @ W`` for 2-D ``gy`` ``(T, out)`` in ``dtype`` -> ``(T, in)`` (the input gradient)."""
    stream = _sliced(m, gy)
    out_f, in_f, g = m.out_features, m.in_features, m._group
    step = math.lcm(32, g)  # column blocks start on whole 32-code runs and whole groups
    cols = (_CHUNK_ELEMS // out_f) // step * step
    if stream is None or not 0 < cols < in_f:
        return gy @ m.dequantize(dtype)
    gx = torch.empty(gy.shape[0], in_f, dtype=dtype, device=gy.device)
    buf = torch.empty(out_f * cols, dtype=dtype, device=gy.device)
    for c0 in range(0, in_f, cols):
        c1 = min(c0 + cols, in_f)
        Wc = buf[: out_f * (c1 - c0)].view(out_f, c1 - c0)
        _fill(Wc, stream[:, c0 * m.bits // 8: c1 * m.bits // 8], m.scales[:, c0 // g: c1 // g],
              None if m.zeros is None else m.zeros[:, c0 // g: c1 // g], m.codebook, m.bits, g)
        torch.mm(gy, Wc, out=gx[:, c0:c1])
    return gx


class _DequantMatmul(torch.autograd.Function):
    """``y = x @ W^T`` with ``W`` rebuilt from packed storage in forward and again in backward."""

    @staticmethod
    def forward(ctx, x, module: QuantLinear, dtype: torch.dtype):  # type: ignore[override]
        ctx.module = module
        ctx.dtype = dtype
        y = _matmul_wt(x.reshape(-1, module.in_features), module, dtype)
        return y.view(*x.shape[:-1], module.out_features)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None
        m = ctx.module
        gx = _matmul_w(grad_out.to(ctx.dtype).reshape(-1, m.out_features), m, ctx.dtype)
        return gx.view(*grad_out.shape[:-1], m.in_features), None, None


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
        g = check_group_size(in_features, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.compute_dtype = compute_dtype
        n_groups = in_features // g
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
    def _group(self) -> int:
        return self.in_features if self.group_size == -1 else self.group_size

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.scales.dtype

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``(out, in)`` weight in ``dtype`` (float32 by default)."""
        return dequantize_packed(self.qweight, self.scales, self.zeros, self.codebook, self.g_idx, self.bits,
                                 self.in_features, self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear expects inputs with last dimension {self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        dtype = self.compute_dtype or (x.dtype if x.is_floating_point() else torch.float32)
        xc = x.to(dtype)
        if xc.requires_grad and torch.is_grad_enabled():
            y = _DequantMatmul.apply(xc, self, dtype)
        else:
            y = _matmul_wt(xc.reshape(-1, self.in_features), self, dtype).view(*xc.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.to(x.dtype) if x.is_floating_point() else y

    def extra_repr(self) -> str:
        kind = "nf" if self.codebook is not None else "uniform"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, {kind}, act_order={self.g_idx is not None}, "
                f"bias={self.bias is not None}")
