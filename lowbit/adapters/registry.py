"""The adapter and initialisation registries.

An adapter is an :class:`~lowbit.adapters.base.AdapterLayer` subclass registered beside its definition with
:func:`register_adapter`. An initialisation is a function registered beside its algorithm, as one of two kinds, each
called one way by :func:`~lowbit.adapters.apply_adapters`:

- a per-linear init (:func:`register_init`, a :class:`LinearInit`) ``fn(wrapper, W, Q, H, cfg, options) -> None``
  sets a fresh wrapper's parameters. With a quantizer it runs inside :func:`~lowbit.quant.model.quantize_model`'s
  calibration pass, while ``W`` (full-precision weight, ``(out, in)`` float32), ``Q`` (the dequantised quantized
  weight, ``(out, in)`` float32) and ``H = X^T X`` (``(in, in)``, ``None`` without calibration) exist; ``W`` and
  ``Q`` are ``None`` unless ``needs_float_weights``.
- a base-quantizing init (:func:`register_base_init`, a :class:`BaseInit`)
  ``fn(model, names, cfg, options, quant, calibration, progress) -> list[dict]`` replaces every target
  ``names[i]`` by a wrapper (:func:`make_adapter`) on its own quantized base and returns a per-module report.

``cfg`` is the :class:`~lowbit.adapters.AdapterConfig`; ``options`` its ``init_options``: an instance of the options
dataclass the init was registered with (``options=LoftQOptions``), or ``None`` for an init without settings. So an
init with settings of its own is one new file and one registration; ``AdapterConfig`` is not edited.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import nn

from .base import AdapterLayer

if TYPE_CHECKING:
    from .config import AdapterConfig

ADAPTERS: dict[str, type[AdapterLayer]] = {}


@dataclass(frozen=True)
class AdapterInit:
    """A registered initialisation: its function, what it needs, and its options class."""

    name: str
    fn: Callable
    adapters: tuple[str, ...] | None  # None: every adapter
    needs_calibration: bool
    needs_float_weights: bool  # the model must be float and a QuantConfig given (the init corrects its error)
    quantizers: tuple[str, ...] | None  # quantization methods it works with (None: any)
    # Raises ValueError for quantization settings the init cannot honour (instead of ignoring them); None: any.
    check_quant: Callable | None = None
    options: type | None = None  # its options dataclass (None: no settings of its own)
    quantizes_base: ClassVar[bool]

    def supports(self, adapter: str) -> bool:
        return self.adapters is None or adapter in self.adapters


@dataclass(frozen=True)
class LinearInit(AdapterInit):
    """A per-linear init: ``fn(wrapper, W, Q, H, cfg, options) -> None`` on each freshly wrapped target."""

    quantizes_base: ClassVar[bool] = False


@dataclass(frozen=True)
class BaseInit(AdapterInit):
    """An init that quantizes and wraps the targets itself:
    ``fn(model, names, cfg, options, quant, calibration, progress) -> list[dict]``."""

    quantizes_base: ClassVar[bool] = True


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


def _register(entry: AdapterInit) -> None:
    if entry.name in INITS:
        raise ValueError(f"initialisation {entry.name!r} is already registered")
    if entry.options is not None and not dataclasses.is_dataclass(entry.options):
        raise TypeError(f"init {entry.name!r}: options must be a dataclass, got {entry.options!r}")
    INITS[entry.name] = entry


def register_init(name: str, adapters: tuple[str, ...] | None = ("lora",), needs_calibration: bool = False,
                  needs_float_weights: bool = False, quantizers: tuple[str, ...] | None = None,
                  check_quant: Callable | None = None, options: type | None = None):
    """Decorator: register per-linear ``fn(wrapper, W, Q, H, cfg, options)`` as initialisation ``name`` for
    ``adapters`` (``None``: all).

    needs_calibration: ``H`` is required (implies running inside the quantization pass, so ``needs_float_weights``
    must be set too). needs_float_weights: the model must be full precision and ``quant`` given; ``W`` and ``Q`` are
    passed. quantizers: the ``quant.method`` values it accepts. check_quant: ``check_quant(quant)`` raises
    ``ValueError`` for settings of the ``QuantConfig`` the init would otherwise ignore (run by
    :meth:`AdapterConfig.check_quant` before any work). options: the dataclass of its own settings
    (``adapter.init_options``), passed to ``fn`` as ``options``.
    """
    def deco(fn: Callable) -> Callable:
        if needs_calibration and not needs_float_weights:
            raise ValueError(f"init {name!r}: a per-linear init receives H only inside the quantization pass; set "
                             f"needs_float_weights=True")
        _register(LinearInit(name, fn, None if adapters is None else tuple(adapters), needs_calibration,
                             needs_float_weights, None if quantizers is None else tuple(quantizers), check_quant,
                             options))
        return fn
    return deco


def register_base_init(name: str, adapters: tuple[str, ...] | None = ("lora",), needs_calibration: bool = False,
                       quantizers: tuple[str, ...] | None = None, check_quant: Callable | None = None,
                       options: type | None = None):
    """Decorator: register ``fn(model, names, cfg, options, quant, calibration, progress) -> list[dict]``, an init
    that quantizes the base itself, as initialisation ``name`` (it always needs the full-precision weights and a
    ``QuantConfig``). The other arguments as for :func:`register_init`."""
    def deco(fn: Callable) -> Callable:
        _register(BaseInit(name, fn, None if adapters is None else tuple(adapters), needs_calibration, True,
                           None if quantizers is None else tuple(quantizers), check_quant, options))
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
def default_init(wrapper: AdapterLayer, W, Q, H, cfg: AdapterConfig, options: None) -> None:
    """Keep the wrapper's own initialisation: a zero delta, so training starts from the base (LoRA: ``A``
    Kaiming-uniform, ``B = 0`` as in Hu et al. 2021 and QLoRA; DiaBlo: zero blocks as in Gurses et al. 2025)."""
