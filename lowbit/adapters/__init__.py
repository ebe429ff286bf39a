"""Adapters on quantized bases (DiaBlo, LoRA) and their initialisations — METHODS.md §2–3.

Layering: pure tensor initialisations (``cloq``, ``loftq``, ``diablo_calibrated``, ``apiq``) and the thin
``nn.Module`` wrappers (``lora``, ``diablo``) below; ``model`` (apply, count, save, load) on top.
"""

from .cloq import cloq_init
from .diablo import DiaBloLinear
from .diablo_calibrated import diablo_calibrated_init
from .loftq import loftq_init
from .lora import LoRALinear
from .model import AdapterConfig, apply_adapters, count_parameters, load_adapter, save_adapter

__all__ = [
    "DiaBloLinear", "LoRALinear", "cloq_init", "diablo_calibrated_init", "loftq_init", "AdapterConfig",
    "apply_adapters", "count_parameters", "load_adapter", "save_adapter",
]
