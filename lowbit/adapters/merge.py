"""Merging adapters into a float model: ``W' = deq(Q) + ΔW`` per adapted layer.

A quantized base cannot absorb an adapter in place (:meth:`AdapterLayer.merge` refuses): its codes would have to
be re-quantized. :func:`merge_to_float` instead replaces every adapter layer by a float ``nn.Linear`` holding the
merged weight and every other ``QuantLinear`` by its dequantised weight, so the model computes exactly what base +
adapter computed (up to float rounding) and can be saved as an ordinary checkpoint, or re-quantized as a whole
(``lowbit export``: GPTQ against the merged model's own calibration inputs).
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.arch import set_submodule
from ..quant.qlinear import QuantLinear
from .base import AdapterLayer, base_weight


def _linear(W: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, device=W.device, dtype=torch.float32)
    with torch.no_grad():
        lin.weight.copy_(W)
        if bias is not None:
            lin.bias.copy_(bias.float())
    return lin.requires_grad_(False)


@torch.no_grad()
def merge_to_float(model: nn.Module) -> dict:
    """Replace, in place, each :class:`AdapterLayer` by ``nn.Linear(W_base + ΔW)`` and each remaining
    ``QuantLinear`` by ``nn.Linear(deq(Q))``, all float32 ``(out, in)``. Returns ``{"merged": n, "dequantized": m}``.
    Raises ``ValueError`` when the model holds neither (nothing to merge)."""
    adapters = {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
    for name, layer in adapters.items():
        W = layer.as_dense()  # (out, in) float32: the base dequantised, plus the delta unless already merged
        set_submodule(model, name, _linear(W, getattr(layer.base, "bias", None)))
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, q in quant.items():
        set_submodule(model, name, _linear(base_weight(q), q.bias))
    if not adapters and not quant:
        raise ValueError("the model holds no adapter and no quantized layer: there is nothing to merge")
    return {"merged": len(adapters), "dequantized": len(quant)}
