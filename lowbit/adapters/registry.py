"""The adapter and initialisation registries.

An adapter is an :class:`~lowbit.adapters.base.AdapterLayer` subclass registered beside its definition with
:func:`register_adapter`. An initialisation is a function registered beside its algorithm with
:func:`register_init`; its flags tell :func:`~lowbit.adapters.apply_adapters` what it needs and how to run it:

- a per-linear init ``fn(wrapper, W, Q, H, cfg) -> None`` sets a fresh wrapper's parameters. With a quantizer it
  runs inside :func:`~lowbit.quant.model.quantize_model`'s calibration pass, while ``W`` (full-precision weight,
  ``(out, in)`` float32), ``Q`` (the dequantised quantized weight) and ``H = X^T X`` (``(in, in)``, ``None``
  without calibration) exist; ``W`` and ``Q`` are ``None`` unless ``needs_float_weights``.
- an init with ``quantizes_base=True`` quantizes the base itself:
  ``fn(model, names, cfg, quant, calibration, progress) -> list[dict]`` replaces every target ``names[i]`` by a
  wrapper (:func:`make_adapter`) on its own quantized base and returns a per-module report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from .base import AdapterLayer

if TYPE_CHECKING:
    from .config import AdapterConfig

ADAPTERS: dict[str, type[AdapterLayer]] = {}


@dataclass(frozen=True)
class AdapterInit:
    """A registered initialisation: its function and what it needs."""

    name: str
    fn: Callable
    adapters: tuple[str, ...] | None  # None: every adapter
    needs_calibration: bool
    needs_float_weights: bool  # the model must be float and a QuantConfig given (the init corrects its error)
    quantizers: tuple[str, ...] | None  # quantization methods it works with (None: any)
    quantizes_base: bool
    # Raises ValueError for quantization settings the init cannot honour (instead of ignoring them); None: any.
    check_quant: Callable | None = None

    def supports(self, adapter: str) -> bool:
        return self.adapters is None or adapter in self.adapters


INITS: dict[str, AdapterInit] = {}


def register_adapter(name: str):
    """Class decorator: register an :class:`AdapterLayer` subclass as adapter ``name``."""
    def deco(cls: type[AdapterLayer]) -> type[AdapterLayer]:
        if not (isinstance(cls, type) and issubclass(cls, AdapterLayer)):
            raise TypeError(f"adapter {name!r} must be an AdapterLayer subclass, got {cls!r}")
        if name in ADAPTERS:
            raise ValueError(f"adapter {name!r} is already registered ({ADAPTERS[name].__name__})")
        if not cls.stored_params:
            raise TypeError(f"adapter {name!r}: {cls.__name__}.stored_params must name its trainable parameters")
        cls.name = name
        cls.title = cls.__dict__.get("title") or name
        ADAPTERS[name] = cls
        return cls
    return deco


def register_init(name: str, adapters: tuple[str, ...] | None = ("lora",), needs_calibration: bool = False,
                  needs_float_weights: bool = False, quantizers: tuple[str, ...] | None = None,
                  quantizes_base: bool = False, check_quant: Callable | None = None):
    """Decorator: register ``fn`` as initialisation ``name`` for ``adapters`` (``None``: all).

    needs_calibration: calibration token ids are required. needs_float_weights: the model must be full precision
    and ``quant`` given (implied by ``quantizes_base``). quantizers: the ``quant.method`` values it accepts.
    quantizes_base: ``fn`` quantizes and wraps the targets itself (see the module docstring for both signatures).
    check_quant: ``check_quant(quant)`` raises ``ValueError`` for settings of the ``QuantConfig`` the init would
    otherwise ignore (run by :meth:`AdapterConfig.check_quant` before any work).
    """
    def deco(fn: Callable) -> Callable:
        if name in INITS:
            raise ValueError(f"initialisation {name!r} is already registered")
        if needs_calibration and not (needs_float_weights or quantizes_base):
            raise ValueError(f"init {name!r}: a per-linear init receives H only inside the quantization pass; set "
                             f"needs_float_weights=True")
        INITS[name] = AdapterInit(name, fn, None if adapters is None else tuple(adapters), needs_calibration,
                                  needs_float_weights or quantizes_base,
                                  None if quantizers is None else tuple(quantizers), quantizes_base, check_quant)
        return fn
    return deco


def unregister_adapter(name: str) -> None:
    ADAPTERS.pop(name, None)


def unregister_init(name: str) -> None:
    INITS.pop(name, None)


@contextlib.contextmanager
def scoped_registrations() -> Iterator[None]:
    """Registrations made inside the block are removed on exit (for tests and experiments)."""
    adapters, inits = dict(ADAPTERS), dict(INITS)
    try:
        yield
    finally:
        ADAPTERS.clear()
        ADAPTERS.update(adapters)
        INITS.clear()
        INITS.update(inits)


def inits_for(adapter: str) -> list[str]:
    """The initialisations registered for ``adapter``: the data-free wrapper-own ones first, then the per-linear
    corrections, then those that quantize the base; by name within each kind (independent of import order)."""
    inits = sorted(INITS.values(), key=lambda i: (i.needs_float_weights, i.quantizes_base, i.name))
    return [i.name for i in inits if i.supports(adapter)]


def make_adapter(base: nn.Module, cfg: AdapterConfig) -> AdapterLayer:
    """A wrapper of ``cfg.adapter`` around ``base`` with its own (zero-delta) initialisation."""
    return ADAPTERS[cfg.adapter].from_config(base, cfg)


@register_init("default", adapters=None)
def default_init(wrapper: AdapterLayer, W, Q, H, cfg: AdapterConfig) -> None:
    """Keep the wrapper's own initialisation: a zero delta, so training starts from the base (LoRA: ``A``
    Kaiming-uniform, ``B = 0`` as in Hu et al. 2021 and QLoRA; DiaBlo: zero blocks as in Gurses et al. 2025)."""
