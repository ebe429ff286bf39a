"""``AdapterConfig``: which adapter, where, and how it starts — validated once, against the registries."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from .registry import ADAPTERS, INITS, AdapterInit, inits_for

if TYPE_CHECKING:
    from ..quant import QuantConfig

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class AdapterConfig:
    """Which adapter, where, and how it starts.

    adapter: a registered adapter (``lora``, ``diablo``). init: an initialisation registered for it — LoRA:
    ``default`` | ``cloq`` | ``loftq`` | ``apiq-bw``; DiaBlo: ``default`` | ``calibrated``. rank/alpha/rslora: LoRA
    (scaling ``alpha/rank``, or ``alpha/sqrt(rank)``). num_blocks: DiaBlo ``N``. dropout: on the adapter's input.
    targets: projection names (suffixes such as ``q_proj``). damp: relative damping of ``H`` for the closed forms.
    loftq_iters: LoftQ alternations. apiq_*: ApiQ-bw optimisation (epochs, learning rates of LoRA and of the
    clipping, AdamW weight decay; the defaults of Liao et al. 2024).
    """

    adapter: str = "lora"
    init: str = "default"
    rank: int = 64
    alpha: float = 16.0
    rslora: bool = False
    num_blocks: int = 64
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    damp: float = 0.01
    loftq_iters: int = 5
    apiq_epochs: int = 20
    apiq_lr_lora: float = 5e-4
    apiq_lr_clip: float = 5e-3
    apiq_weight_decay: float = 0.1

    def __post_init__(self) -> None:
        if self.adapter not in ADAPTERS:
            raise ValueError(f"unknown adapter {self.adapter!r}; choose one of {sorted(ADAPTERS)}")
        available = inits_for(self.adapter)
        if self.init not in available:
            raise ValueError(f"init {self.init!r} is not available for {self.adapter}; choose one of "
                             f"{available}{self._hint()}")
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.num_blocks, int) or self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be a positive integer, got {self.num_blocks!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {self.damp}")
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if not self.targets:
            raise ValueError("targets is empty; name at least one projection, e.g. ['q_proj', 'v_proj']")
        if self.loftq_iters < 1 or self.apiq_epochs < 0:
            raise ValueError(f"loftq_iters must be >= 1 and apiq_epochs >= 0, got {self.loftq_iters}, "
                             f"{self.apiq_epochs}")

    def _hint(self) -> str:
        """Point to this adapter's counterpart of an init registered for another adapter (same requirements)."""
        other = INITS.get(self.init)
        if other is None:
            return ""
        key = (other.needs_calibration, other.needs_float_weights, other.quantizes_base)
        same = [n for n in inits_for(self.adapter)
                if (INITS[n].needs_calibration, INITS[n].needs_float_weights, INITS[n].quantizes_base) == key]
        return f" (for {ADAPTERS[self.adapter].title} use init={same[0]!r})" if len(same) == 1 else ""

    def check_quant(self, quant: QuantConfig | None) -> None:
        """Raise ``ValueError`` when this init cannot run with ``quant`` as configured: a quantization method it
        does not use, or a setting it would ignore (e.g. ``sym`` or ``clip_search`` for ``apiq-bw``). Needs no
        model, so a recipe can check it before loading anything; :func:`apply_adapters` runs it too."""
        init = INITS[self.init]
        if quant is None or not init.needs_float_weights:
            return
        if init.quantizers is not None and quant.method not in init.quantizers:
            raise ValueError(f"init {self.init!r} uses its own quantizer ({' or '.join(init.quantizers)}); got "
                             f"quant.method={quant.method!r}")
        if init.check_quant is not None:
            init.check_quant(quant)

    @property
    def init_spec(self) -> AdapterInit:
        """The registered initialisation (its flags: ``needs_calibration``, ``quantizes_base``, ...)."""
        return INITS[self.init]

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def needs_calibration(self) -> bool:
        return INITS[self.init].needs_calibration

    def to_dict(self) -> dict:
        return asdict(self)
