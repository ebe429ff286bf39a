"""Adapters on quantized bases and their initialisations: LoRA (Hu et al. 2021), DiaBlo (Gurses et al. 2025) and
QWHA (Jeon et al. 2025); CLoQ (Deng et al. 2025), LoftQ (Li et al. 2023), ApiQ-bw (Liao et al. 2024), a calibrated
DiaBlo init and QWHA's own init.

Layering: ``base`` (the :class:`~lowbit.adapters.base.AdapterLayer` wrapper class) → ``registry`` (adapters and
initialisations by name) → ``config`` (:class:`AdapterConfig`) → one file per adapter (``lora``, ``diablo``, ``qwha``
on ``hadamard``) and per initialisation (``cloq``, ``diablo_calibrated``, ``loftq``, ``apiq`` on ``lwc``,
``qwha_init``), each registering itself beside its algorithm → ``model`` (apply, count), ``fingerprint`` (the base
an adapter was trained on) and ``storage`` (save, load in PEFT's layout, refusing another base).

Adding an adapter: subclass ``AdapterLayer`` in a new file, decorate it with ``@register_adapter("name")`` and import
the file below. Adding an initialisation: decorate its function with ``@register_init("name", ..., options=ItsOptions)``
(per-linear) or ``@register_base_init(...)`` (it quantizes the base itself) next to the algorithm, with a dataclass
of its own settings (``adapter.init_options``), and import the file below.
"""

from . import apiq, cloq, diablo, diablo_calibrated, loftq, lora, qwha, qwha_init  # noqa: F401  (registers them)
from .apiq import apiq_bw
from .base import AdapterLayer
from .cloq import cloq_init
from .config import AdapterConfig
from .diablo import DiaBloLinear
from .diablo_calibrated import diablo_calibrated_init
from .fingerprint import base_difference, base_fingerprint, describe_base
from .loftq import loftq_init
from .lora import LoRALinear
from .model import adapter_modules, apply_adapters, count_parameters, expected_trainable, without_adapters
from .qwha import QWHALinear
from .qwha_init import qwha_init_spectrum
from .registry import ADAPTERS, INITS, register_adapter, register_base_init, register_init
from .storage import (
    BaseMismatchError,
    load_adapter,
    read_adapter_config,
    read_adapter_meta,
    save_adapter,
    set_adapter_weights,
)

__all__ = [
    "AdapterConfig", "AdapterLayer", "ADAPTERS", "INITS", "register_adapter", "register_init", "register_base_init",
    "apply_adapters", "adapter_modules", "count_parameters", "expected_trainable", "without_adapters", "save_adapter",
    "load_adapter", "read_adapter_config", "set_adapter_weights", "DiaBloLinear", "LoRALinear", "cloq_init",
    "loftq_init", "diablo_calibrated_init", "apiq_bw", "base_fingerprint", "base_difference", "describe_base",
    "read_adapter_meta", "BaseMismatchError", "QWHALinear", "qwha_init_spectrum",
]
