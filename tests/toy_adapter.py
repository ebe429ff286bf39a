"""A toy adapter for registry tests: ``y = base(x) + x * d`` with ``d`` ``(in,)`` (square layers only), and a toy
initialisation setting ``d`` to the diagonal of the quantization error. Tests register them themselves (no file in
lowbit), which is what "extending is one registration" means."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.adapters import AdapterLayer


class ToyDiag(AdapterLayer):
    """``y = base(x) + x * d`` with ``d`` ``(in,)``, zero-initialised; square layers only."""

    stored_params = {"toy_diag": "diag"}
    peft_type = "LOWBIT_TOY"

    def __init__(self, base: nn.Module, dropout: float = 0.0) -> None:
        super().__init__(base, dropout)
        self.diag = nn.Parameter(torch.zeros(self.in_features))

    @classmethod
    def from_config(cls, base, cfg):
        return cls(base, cfg.dropout)

    @classmethod
    def state_shapes(cls, in_features, out_features, cfg):
        if in_features != out_features:
            raise ValueError(f"the toy adapter needs a square layer, got {out_features}x{in_features}")
        return {"toy_diag": (in_features,)}

    @classmethod
    def peft_config(cls, cfg, base_name):
        return {"peft_type": cls.peft_type, "target_modules": sorted(cfg.targets), "base_model_name_or_path": base_name}

    def adapter_forward(self, x):
        return x * self.diag

    def delta_weight(self):
        return torch.diag(self.diag)


def toy_init(wrapper, W, Q, H, cfg, options):
    with torch.no_grad():
        wrapper.diag.copy_(torch.diagonal(W - Q))
