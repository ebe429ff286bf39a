"""LoRA (Hu et al. 2021, arXiv 2106.09685) on a frozen float or quantized base, as in QLoRA (Dettmers et al. 2023,
arXiv 2305.14314) and GPTQ-LoRA.

``y = base(x) + s · dropout(x) @ A^T @ B^T`` with ``A`` ``(r, in)``, ``B`` ``(out, r)`` trained in FP32 and
``s = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA, Kalajdzievski 2023, arXiv 2312.03732). Default init as in
PEFT: ``A`` Kaiming-uniform (``a = sqrt(5)``), ``B = 0``, so the wrapped layer starts equal to its base. The adapter
branch runs in float32 whatever the base dtype and is cast back to the base output's dtype. Saved in PEFT's layout
(``<module>.lora_A.weight``, ``<module>.lora_B.weight``), which ``peft.PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer, device_of, peft_targets
from .registry import register_adapter


def check_rank(rank: int, in_features: int, out_features: int) -> None:
    """``rank`` must be a positive integer below ``min(in, out)`` (a full-rank adapter is a dense fine-tune)."""
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if rank >= min(in_features, out_features):
        raise ValueError(f"LoRA rank {rank} must be < min(in, out) = {min(in_features, out_features)} for a "
                         f"{out_features}x{in_features} layer (a full-rank adapter is a dense fine-tune); choose a "
                         f"smaller rank")


@register_adapter("lora")
class LoRALinear(AdapterLayer):
    """``base`` (``nn.Linear`` or ``QuantLinear``, frozen) plus a rank-``rank`` FP32 LoRA branch.

    Parameters ``lora_A`` ``(rank, in)`` and ``lora_B`` ``(out, rank)``; ``scaling`` = ``alpha/rank``
    (``alpha/sqrt(rank)`` with ``rslora``).
    """

    title = "LoRA"
    stored_params = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}
    peft_type = "LORA"

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        super().__init__(base, dropout)
        inp, out = self.in_features, self.out_features
        check_rank(rank, inp, out)
        self.rank, self.alpha, self.rslora = rank, float(alpha), bool(rslora)
        self.scaling = self.alpha / (math.sqrt(rank) if rslora else rank)
        dev = device_of(base)
        self.lora_A = nn.Parameter(torch.empty(rank, inp, dtype=torch.float32, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(out, rank, dtype=torch.float32, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @classmethod
    def from_config(cls, base: nn.Module, cfg) -> LoRALinear:
        return cls(base, cfg.rank, cfg.alpha, cfg.dropout, rslora=cfg.rslora)

    @classmethod
    def state_shapes(cls, in_features: int, out_features: int, cfg) -> dict[str, tuple[int, ...]]:
        check_rank(cfg.rank, in_features, out_features)
        return {"lora_A.weight": (cfg.rank, in_features), "lora_B.weight": (out_features, cfg.rank)}

    @classmethod
    def summary(cls, cfg) -> str:
        return f"lora r={cfg.rank}"

    @classmethod
    def peft_config(cls, cfg, base_name: str | None) -> dict:
        return {"peft_type": cls.peft_type, "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
                "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora, "target_modules": sorted(cfg.targets),
                "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
                "base_model_name_or_path": base_name}

    @classmethod
    def config_from_peft(cls, peft: dict) -> dict:
        return {"rank": int(peft["r"]), "alpha": float(peft["lora_alpha"]),
                "rslora": bool(peft.get("use_rslora", False)), "dropout": float(peft.get("lora_dropout", 0.0)),
                "targets": peft_targets(peft)}

    def set_factors(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Load ``A`` ``(r, in)`` and ``B`` ``(out, r)`` (already divided by the scaling)."""
        if tuple(A.shape) != tuple(self.lora_A.shape) or tuple(B.shape) != tuple(self.lora_B.shape):
            raise ValueError(f"LoRA factors of shapes A {tuple(A.shape)}, B {tuple(B.shape)} do not fit this layer "
                             f"(A {tuple(self.lora_A.shape)}, B {tuple(self.lora_B.shape)})")
        with torch.no_grad():
            self.lora_A.copy_(A.float())
            self.lora_B.copy_(B.float())

    def set_delta(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Set the factors so that the adapter's delta ``s · lora_B @ lora_A`` equals ``B @ A``: each factor is
        divided by ``sqrt(s)``, splitting the scaling evenly."""
        s = math.sqrt(self.scaling)
        self.set_factors(A / s, B / s)

    def delta_weight(self) -> torch.Tensor:
        """``s · B @ A`` ``(out, in)`` float32."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        # PEFT's order of operations (lora_B(lora_A(x)) * s), so PEFT reproduces our logits.
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, rslora={self.rslora}"
