"""``AdapterConfig``: which adapter, where, and how it starts — validated once, against the registries."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from ..quant.config import build_options, split_legacy
from .registry import ADAPTERS, INITS, AdapterInit, inits_for

if TYPE_CHECKING:
    from ..quant import QuantConfig

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class AdapterConfig:
    """Which adapter, where, and how it starts.

    adapter: a registered adapter (``lora``, ``diablo``, ``qwha``). init: an initialisation registered for it —
    LoRA: ``default`` | ``cloq`` | ``loftq`` | ``apiq-bw``; DiaBlo: ``default`` | ``calibrated``; QWHA: ``default`` |
    ``qwha``. rank/alpha/rslora: LoRA (scaling ``alpha/rank``, or ``alpha/sqrt(rank)``); ``rank`` also sets QWHA's
    budget, LoRA's count ``rank·(in + out)`` (QWHA has no scaling to set). num_blocks: DiaBlo ``N``. dropout: on the
    adapter's input. targets: projection names (suffixes such as ``q_proj``).
    init_options: the init's own settings, an instance of the options class it was registered with (``cloq``,
    ``calibrated`` and ``qwha``: ``damp``, the relative damping of ``H`` in their solves; ``loftq``: ``loftq_iters``;
    ``apiq-bw``: ``apiq_epochs``, ``apiq_lr_lora``, ``apiq_lr_clip``, ``apiq_weight_decay``; ``default`` none).
    Given as a mapping (``adapter.init_options.apiq_epochs=5``) it is converted and checked against that class;
    unset options keep the init's defaults.
    """

    adapter: str = "lora"
    init: str = "default"
    rank: int = 64
    alpha: float = 16.0
    rslora: bool = False
    num_blocks: int = 64
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    init_options: Any = None

    # Settings that were top-level fields before the options moved beside their init (recipes are told so).
    MOVED_KEYS = {k: f"init_options.{k}" for k in ("damp", "loftq_iters", "apiq_epochs", "apiq_lr_lora",
                                                    "apiq_lr_clip", "apiq_weight_decay")}

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
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            # LoRA scales its branch by alpha/rank: 0 switches the adapter off, a negative value flips its sign
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if not self.targets:
            raise ValueError("targets is empty; name at least one projection, e.g. ['q_proj', 'v_proj']")
        self.init_options = build_options(INITS, "init", self.init, self.init_options)

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
        """Plain nested dict (``init_options`` a dict, or ``None`` for an init without options)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AdapterConfig:
        """Rebuild from :meth:`to_dict` output, also of older lowbit versions: their flat format (``damp``,
        ``loftq_iters``, ``apiq_*`` at top level for every init) has the init's own settings moved into
        ``init_options`` and the others dropped."""
        valid = {f.name for f in fields(cls)}
        return cls(**split_legacy(d, valid, INITS, d.get("init", cls.init), "init_options"))
