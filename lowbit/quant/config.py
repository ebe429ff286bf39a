"""``QuantConfig`` — how to quantize a model's decoder linears — and the quantizer registry.

A quantizer maps ``(W (out, in), H (in, in) or None, QuantConfig) -> QuantizedWeight``. It is registered beside its
algorithm (``rtn.py``, ``gptq.py``, ``magr.py``, ``nf.py``) with :func:`register_quantizer`; adding a quantizer is one
new file with one registration, imported from ``lowbit/quant/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch

from .qweight import SUPPORTED_BITS, QuantizedWeight


@dataclass(frozen=True)
class Quantizer:
    """A registered quantization method: its function and what it needs."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor | None, QuantConfig], QuantizedWeight]
    needs_calibration: bool
    bits: tuple[int, ...] = SUPPORTED_BITS
    needs_groups: bool = False  # True: a block size is required (group_size > 0)
    ignores: tuple[str, ...] = ()  # QuantConfig fields it has no use for: a non-default value is refused


QUANTIZERS: dict[str, Quantizer] = {}
GROUP_PARAMS = ("current", "block-start")


def register_quantizer(name: str, needs_calibration: bool, bits: tuple[int, ...] = SUPPORTED_BITS,
                       needs_groups: bool = False, ignores: tuple[str, ...] = ()):
    """Decorator: register ``fn(W, H, config) -> QuantizedWeight`` as quantization method ``name``. ``ignores``:
    :class:`QuantConfig` fields the method has no use for (``QuantConfig`` refuses a non-default value)."""
    def deco(fn):
        if name in QUANTIZERS:
            raise ValueError(f"quantizer {name!r} is already registered")
        QUANTIZERS[name] = Quantizer(name, fn, needs_calibration, tuple(bits), needs_groups, tuple(ignores))
        return fn
    return deco


@dataclass
class QuantConfig:
    """How to quantize a model's decoder linears.

    method: a registered quantizer (``rtn``, ``gptq``, ``magr-gptq``, ``magr-rtn``, ``nf``).
    bits: 2, 3, 4 or 8 (``nf``: 4 or 2). group_size: inputs per scale (``-1``: per output channel; NF block size).
    sym: symmetric grid. act_order: GPTQ columns by descending ``diag(H)``; static_groups: each group's scale
    and zero fixed up front on the original weights, so groups stay contiguous (plain ``g_idx``, any GPTQ kernel).
    The default, act-order with static groups, is the most accurate contiguous-group GPTQ on real checkpoints
    (docs/RESULTS.md); ``act_order=false static_groups=false`` is the plain GPTQ of the paper.
    group_params: GPTQ without static groups: a group's scale and zero from its ``current`` (error-updated)
    weights, or from the weights as they stood when the current column block began (``block-start``: the rule of the
    reference GPTQ code and GPTQModel, for results comparable with theirs).
    damp: GPTQ relative damping. block_size: GPTQ column block. clip_search: MSE range search.
    magr_alpha: MagR penalty (default 1e-3 per-channel, 1e-4 per-group). magr_iters: MagR proximal iterations.
    magr_solver: ``pg`` (the paper's plain proximal gradient) or ``fista`` (accelerated, with adaptive restart: the
    same objective in far fewer iterations; see ``magr.py``).
    targets: linear names (suffixes such as ``q_proj``) to quantize; default all of the architecture's groups.
    """

    method: str = "gptq"
    bits: int = 4
    group_size: int = 64
    sym: bool = False
    act_order: bool = True
    static_groups: bool = True
    group_params: str = "current"
    damp: float = 0.01
    block_size: int = 128
    clip_search: bool = False
    magr_alpha: float | None = None
    magr_iters: int = 200
    magr_solver: str = "pg"
    targets: list[str] | None = None

    def __post_init__(self) -> None:
        if self.method not in QUANTIZERS:
            raise ValueError(f"unknown quantization method {self.method!r}; choose one of {sorted(QUANTIZERS)}")
        q = QUANTIZERS[self.method]
        if self.bits not in q.bits:
            raise ValueError(f"bits must be one of {list(q.bits)} for method {self.method!r}, got {self.bits!r}")
        if self.group_size != -1 and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise ValueError(f"group_size must be a positive integer or -1 (per-channel), got {self.group_size!r}")
        if q.needs_groups and self.group_size == -1:
            raise ValueError(f"method {self.method!r} needs a block size (group_size > 0, e.g. 64)")
        defaults = {f.name: f.default for f in fields(self)}
        for name in q.ignores:
            if getattr(self, name) != defaults[name]:
                raise ValueError(f"method {self.method!r} has no use for {name}={getattr(self, name)!r} (it would be "
                                 f"ignored): leave {name} at {defaults[name]!r}")
        if self.group_params not in GROUP_PARAMS:
            raise ValueError(f"group_params must be one of {list(GROUP_PARAMS)}, got {self.group_params!r}")
        if self.static_groups and self.group_params != "current":
            raise ValueError(f"group_params={self.group_params!r} applies to GPTQ without static groups (static_groups "
                             f"fixes every group's parameters up front); set static_groups=false")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {self.damp}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.magr_alpha is not None and self.magr_alpha <= 0:
            raise ValueError(f"magr_alpha must be > 0, got {self.magr_alpha}")
        if self.magr_iters < 1:
            raise ValueError(f"magr_iters must be >= 1, got {self.magr_iters}")
        if self.magr_solver not in ("pg", "fista"):
            raise ValueError(f"magr_solver must be 'pg' or 'fista', got {self.magr_solver!r}")
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if self.targets is not None and not self.targets:
            raise ValueError("targets is empty; name at least one linear (e.g. ['q_proj']) or leave it unset (all)")

    @property
    def needs_calibration(self) -> bool:
        return QUANTIZERS[self.method].needs_calibration

    def quantize(self, W: torch.Tensor, H: torch.Tensor | None) -> QuantizedWeight:
        """Quantize one ``(out, in)`` weight with this configuration (``H``: ``(in, in)`` or ``None``)."""
        return QUANTIZERS[self.method].fn(W, H, self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        """Rebuild from :meth:`to_dict` output (also of older lowbit versions, which stored an empty ``extra``)."""
        d = dict(d)
        if d.get("extra") == {}:
            d.pop("extra")
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(f"unknown quantization setting(s) {unknown}; valid: {sorted(valid)}")
        return cls(**d)
