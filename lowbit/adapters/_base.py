"""Shared helpers of the adapter wrappers: which base layers they accept and how to read their shape."""

from __future__ import annotations

import torch
from torch import nn


def base_shape(base: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or ``QuantLinear`` (anything with those attributes)."""
    inp, out = getattr(base, "in_features", None), getattr(base, "out_features", None)
    if not isinstance(inp, int) or not isinstance(out, int):
        raise TypeError(f"adapter base must be a linear layer with in_features/out_features (nn.Linear or "
                        f"QuantLinear), got {type(base).__name__}")
    return inp, out


def base_weight(base: nn.Module) -> torch.Tensor:
    """The base's dense ``(out, in)`` float32 weight (dequantised for a ``QuantLinear``)."""
    if hasattr(base, "dequantize"):
        return base.dequantize(torch.float32)
    return base.weight.detach().float()


def freeze(base: nn.Module) -> None:
    for p in base.parameters():
        p.requires_grad_(False)
