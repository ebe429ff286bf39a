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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .packing import pack, packed_size, unpack
from .qweight import QuantizedWeight, check_bits, check_group_size


def dequantize_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      codebook: torch.Tensor | None, g_idx: torch.Tensor | None, bits: int, in_features: int,
                      group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``(out, in)`` weight in ``dtype`` from packed storage."""
    codes = unpack(qweight, bits, in_features)  # (out, in) uint8
    out = codes.shape[0]
    if g_idx is None:
        g = in_features if group_size == -1 else group_size
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


class _DequantMatmul(torch.autograd.Function):
    """``y = x @ W^T`` with ``W`` rebuilt from packed storage in forward and again in backward."""

    @staticmethod
    def forward(ctx, x, module: QuantLinear, dtype: torch.dtype):  # type: ignore[override]
        W = module.dequantize(dtype)
        ctx.module = module
        ctx.dtype = dtype
        return x @ W.t()

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None
        W = ctx.module.dequantize(ctx.dtype)
        return grad_out.to(ctx.dtype) @ W, None, None


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
            y = F.linear(xc, self.dequantize(dtype))
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.to(x.dtype) if x.is_floating_point() else y

    def extra_repr(self) -> str:
        kind = "nf" if self.codebook is not None else "uniform"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, {kind}, act_order={self.g_idx is not None}, "
                f"bias={self.bias is not None}")
