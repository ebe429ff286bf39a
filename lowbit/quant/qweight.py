"""`QuantizedWeight`: the one result type of every lowbit quantizer, plus the uniform quantization primitives.

A quantized weight ``W`` of shape ``(out, in)`` is stored as integer codes ``(out, in)`` and per-(row, group)
parameters ``(out, G)``; input column ``c`` belongs to group ``g_idx[c]`` (``c // group_size`` unless
act-order permuted the columns). ``G = ceil(in / group_size)``: when the group size does not divide the input width
(SmolLM2's 576 inputs in groups of 128), the last group is shorter, as in GPTQModel. Two code kinds:

- uniform (RTN, GPTQ, MagR+…): ``W_hat = scale * (code - zero)``;
- codebook (NormalFloat): ``W_hat = absmax * codebook[code]`` (``zeros`` is ``None``).

Scales are kept fp16-representable (rounded when they are chosen), so that the packed fp16 storage of
:class:`~lowbit.quant.QuantLinear` dequantises to exactly the same tensor as :meth:`QuantizedWeight.dequantize`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
# Smallest fp16 subnormal: a scale must survive the fp16 cast without becoming 0.
_MIN_SCALE = 2.0**-24


def check_bits(bits: int, allowed: tuple[int, ...] = SUPPORTED_BITS) -> None:
    if bits not in allowed:
        raise ValueError(f"bits must be one of {list(allowed)}, got {bits!r}; "
                         f"pick e.g. --bits 4 (or 2 for the aggressive setting)")


def check_group_size(in_features: int, group_size: int) -> int:
    """Validate a group size; returns the effective group size (``-1`` -> ``in``). A size that does not divide
    ``in_features`` is allowed: the last group is shorter (``num_groups`` = ``ceil(in / g)``)."""
    if group_size == -1:
        return in_features
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer or -1 (one group per row), got {group_size!r}")
    return group_size


def num_groups(in_features: int, group_size: int) -> int:
    """``ceil(in / g)`` groups of ``g = check_group_size(in, group_size)`` inputs (the last one may be shorter)."""
    g = check_group_size(in_features, group_size)
    return -(-in_features // g)


def pad_to_groups(W: torch.Tensor, g: int) -> torch.Tensor:
    """``W`` ``(rows, in)`` with zero columns appended up to a multiple of ``g`` (``W`` itself when ``g`` divides).

    Zero columns change no group's parameters: min-max ranges and absmax already include 0, and 0 is represented
    exactly (an integer zero point maps it to itself), so the padded group quantizes its real columns as a shorter
    group would."""
    pad = -W.shape[1] % g
    return W if pad == 0 else torch.nn.functional.pad(W, (0, pad))


def check_weight(W: torch.Tensor, name: str = "W") -> None:
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        shape = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise ValueError(f"{name} must be a 2-D tensor of shape (out, in), got {shape}")
    if not W.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {W.dtype}")
    if W.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(W.shape)})")
    if not torch.isfinite(W).all():
        n_bad = int((~torch.isfinite(W)).sum())
        raise ValueError(f"{name} holds {n_bad} NaN/Inf values of {W.numel()}; the checkpoint is corrupt or was "
                         f"saved after a diverged run — fix or reload the weights before quantizing")


def default_group_index(in_features: int, group_size: int, device: torch.device | str | None = None
                        ) -> torch.Tensor:
    """``(in,)`` int64 group of each input column without act-order: ``c // group_size`` (``-1``: all 0)."""
    g = in_features if group_size == -1 else group_size
    return torch.arange(in_features, device=device) // g


def round_fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16-representable value (kept in the input dtype)."""
    return x.clamp(min=-65504.0, max=65504.0).to(torch.float16).to(x.dtype)


def uniform_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero per row of ``w`` ``(rows, cols)`` -> ``(rows,), (rows,)`` (docs/METHODS.md, Quantization).

    The range always contains 0; an all-zero row gets ``[-1, 1]``. The zero point is an integer.
    """
    return params_from_range(w.min(dim=1).values, w.max(dim=1).values, bits, sym)


def params_from_range(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point for the ranges ``[xmin, xmax]`` (any matching shapes)."""
    maxq = 2**bits - 1
    xmin = xmin.clamp(max=0)
    xmax = xmax.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    both0 = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both0, -torch.ones_like(xmin), xmin)
    xmax = torch.where(both0, torch.ones_like(xmax), xmax)
    scale = (2 * xmax if sym else xmax - xmin) / maxq
    scale = round_fp16(scale).clamp(min=_MIN_SCALE)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``clamp(round(w/scale) + zero, 0, maxq)``; ``scale``/``zero`` broadcast against ``w``."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return scale * (quantize_codes(w, scale, zero, bits) - zero)


@dataclass
class QuantizedWeight:
    """Integer codes plus per-group parameters of one ``(out, in)`` weight.

    Attributes:
        codes: ``(out, in)`` uint8, values in ``[0, 2^bits)``, in the original column order.
        scales: ``(out, G)`` float32 (fp16-representable): the uniform scale or the NF absmax.
        zeros: ``(out, G)`` float32 integer zero points (uniform), or ``None`` (codebook).
        bits: 2, 3, 4 or 8.
        group_size: inputs per group (``-1``: one group per row).
        g_idx: ``(in,)`` int64 group of each input column, or ``None`` for ``c // group_size``.
        codebook: ``(2^bits,)`` float32 code values for NormalFloat, else ``None``.
        sym: whether the uniform grid is symmetric (zero point ``2^(bits-1)``).
        method: the producing algorithm, for bookkeeping only.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int = -1
    g_idx: torch.Tensor | None = None
    codebook: torch.Tensor | None = None
    sym: bool = False
    method: str = ""

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.codes.dim() != 2:
            raise ValueError(f"codes must be (out, in), got shape {tuple(self.codes.shape)}")
        out, inp = self.codes.shape
        G = num_groups(inp, self.group_size)
        n_groups = self.scales.shape[1] if self.scales.dim() == 2 else -1
        if self.scales.shape[0] != out or n_groups != G:
            raise ValueError(f"scales must be ({out}, {G}) for group_size {self.group_size}, "
                             f"got {tuple(self.scales.shape)}")
        if (self.zeros is None) == (self.codebook is None):
            raise ValueError("exactly one of zeros (uniform codes) or codebook (NormalFloat codes) must be set")
        if self.zeros is not None and self.zeros.shape != self.scales.shape:
            raise ValueError(f"zeros shape {tuple(self.zeros.shape)} != scales shape {tuple(self.scales.shape)}")
        if self.codebook is not None and self.codebook.numel() != 2**self.bits:
            raise ValueError(f"a {self.bits}-bit codebook needs {2**self.bits} values, got {self.codebook.numel()}")
        if self.g_idx is not None and self.g_idx.shape != (inp,):
            raise ValueError(f"g_idx must have shape ({inp},), got {tuple(self.g_idx.shape)}")
        self.codes = self.codes.to(torch.uint8)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def num_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def is_uniform(self) -> bool:
        return self.zeros is not None

    def group_index(self) -> torch.Tensor:
        """``(in,)`` int64 group of every input column."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return default_group_index(self.codes.shape[1], self.group_size, self.codes.device)

    def dequantize(self) -> torch.Tensor:
        """The represented weight ``(out, in)``, float32."""
        gi = self.group_index()
        scale = self.scales.float()[:, gi]
        if self.zeros is not None:
            return scale * (self.codes.float() - self.zeros.float()[:, gi])
        return scale * self.codebook.float()[self.codes.long()]

    def to(self, device: torch.device | str) -> QuantizedWeight:
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedWeight(mv(self.codes), mv(self.scales), mv(self.zeros), self.bits, self.group_size,
                               mv(self.g_idx), mv(self.codebook), self.sym, self.method)
