"""``QuantConfig`` — how to quantize a model's decoder linears — and the quantizer registry.

A quantizer maps ``(W (out, in), H (in, in) or None, QuantConfig) -> QuantizedWeight``. It is registered beside its
algorithm (``rtn.py``, ``gptq.py``, ``magr.py``, ``nf.py``) with :func:`register_quantizer`, together with its own
options dataclass (``options=GPTQOptions``); adding a quantizer with settings of its own is one new file with one
registration, imported from ``lowbit/quant/__init__.py``: ``QuantConfig`` itself holds only what every quantizer
reads, and the method's settings arrive as ``QuantConfig.options`` (an instance of its options class).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from .qweight import SUPPORTED_BITS, QuantizedWeight


@dataclass(frozen=True)
class Quantizer:
    """A registered quantization method: its function, what it needs, and its options class."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor | None, QuantConfig], QuantizedWeight]
    needs_calibration: bool
    bits: tuple[int, ...] = SUPPORTED_BITS
    needs_groups: bool = False  # True: a block size is required (group_size > 0)
    ignores: tuple[str, ...] = ()  # common QuantConfig fields it has no use for: a non-default value is refused
    options: type | None = None  # its options dataclass (None: it has no settings of its own)


QUANTIZERS: dict[str, Quantizer] = {}


def register_quantizer(name: str, needs_calibration: bool, bits: tuple[int, ...] = SUPPORTED_BITS,
                       needs_groups: bool = False, ignores: tuple[str, ...] = (), options: type | None = None):
    """Decorator: register ``fn(W, H, config) -> QuantizedWeight`` as quantization method ``name``. ``ignores``:
    common :class:`QuantConfig` fields the method has no use for (``QuantConfig`` refuses a non-default value).
    ``options``: a dataclass of the method's own settings (defaults = the method's defaults); ``fn`` reads them
    from ``config.options``."""
    if options is not None and not dataclasses.is_dataclass(options):
        raise TypeError(f"quantizer {name!r}: options must be a dataclass, got {options!r}")

    def deco(fn):
        if name in QUANTIZERS:
            raise ValueError(f"quantizer {name!r} is already registered")
        QUANTIZERS[name] = Quantizer(name, fn, needs_calibration, tuple(bits), needs_groups, tuple(ignores), options)
        return fn
    return deco


# ------------------------------------------------------------------------------ options: a dict -> the method's class

def option_owners(registry: dict[str, Any]) -> dict[str, list[str]]:
    """option name -> the registered names (methods, inits) whose ``.options`` class has it."""
    owners: dict[str, list[str]] = {}
    for name, entry in sorted(registry.items()):
        for f in fields(entry.options) if entry.options is not None else ():
            owners.setdefault(f.name, []).append(name)
    return owners


def as_number(value: Any, kinds: tuple) -> Any:
    """YAML reads ``1e-3`` as a string and overrides give ``key=8``: a string, or an int where only a float is taken,
    converted to the number type of a field whose non-None types are ``kinds``; anything else unchanged."""
    if isinstance(value, int) and not isinstance(value, bool) and float in kinds and int not in kinds:
        return float(value)
    if isinstance(value, str) and str not in kinds:
        for kind in (int, float):
            if kind in kinds:
                try:
                    return kind(value)
                except ValueError:
                    pass
    return value


def _coerce_option(value: Any, hint: Any, label: str) -> Any:
    """Convert a scalar option by the field's type (:func:`as_number`), refuse a value of the wrong type (a string
    for an int, a number for a bool)."""
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    kinds = tuple(a for a in (typing.get_args(hint) if union else (hint,)) if a is not type(None))
    if value is None or not kinds or not all(k in (int, float, bool, str) for k in kinds):
        return value
    value = as_number(value, kinds)
    if not any(isinstance(value, k) and not (isinstance(value, bool) and k is not bool) for k in kinds):
        raise ValueError(f"{label} must be {' | '.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


def build_options(registry: dict[str, Any], kind: str, name: str, values: Any) -> Any:
    """The options instance of registered ``kind`` ``name`` (``kind``: "method" or "init") from ``values``: ``None``
    (the defaults), a mapping (from YAML or overrides) or already an instance of its options class. A key the
    entry does not know is refused, listing its options, or naming the entries it belongs to."""
    cls = registry[name].options
    if cls is not None and type(values) is cls:  # exactly: MagR+GPTQ's options are GPTQOptions too, with more
        return values
    if dataclasses.is_dataclass(values) and not isinstance(values, type):
        raise ValueError(f"{kind} {name!r} takes {cls.__name__ if cls else 'no'} options, got "
                         f"{type(values).__name__}")
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ValueError(f"options of {kind} {name!r} must be a mapping of option: value, got {values!r}")
    valid = {f.name for f in fields(cls)} if cls is not None else set()
    for key in values:
        if key in valid:
            continue
        owners = option_owners(registry).get(key)
        mine = f"its options: {sorted(valid)}" if valid else "it has no options"
        if owners:
            raise ValueError(f"option {key!r} belongs to {kind} {' / '.join(map(repr, owners))}, not to {kind} "
                             f"{name!r} ({mine})")
        raise ValueError(f"unknown option {key!r} for {kind} {name!r}; {mine}")
    if cls is None:
        return None
    hints = typing.get_type_hints(cls)
    try:
        return cls(**{k: _coerce_option(v, hints[k], f"option {k!r} of {kind} {name!r}") for k, v in values.items()})
    except TypeError as e:
        raise ValueError(f"options of {kind} {name!r}: {e}") from None


def split_legacy(d: dict, common: set[str], registry: dict[str, Any], name: str, options_key: str) -> dict:
    """A copy of the flat settings dict ``d`` written by an older lowbit (every method's settings at top level)
    with the keys of ``name``'s options moved under ``options_key``; the other methods' keys are dropped (they
    had no effect on ``name``). Keys nobody knows are left for the caller to refuse."""
    d = dict(d)
    owners = option_owners(registry)
    cls = registry[name].options if name in registry else None
    mine = {f.name for f in fields(cls)} if cls is not None else set()
    moved = dict(d.get(options_key) or {})
    for key in [k for k in d if k not in common and k in owners]:
        value = d.pop(key)
        if key in mine:
            moved.setdefault(key, value)
    d[options_key] = moved
    return d


# ---------------------------------------------------------------------------------------------------- QuantConfig

@dataclass
class QuantConfig:
    """How to quantize a model's decoder linears.

    The fields every quantizer reads (or refuses a non-default value of, via ``ignores``):
    method: a registered quantizer (``rtn``, ``gptq``, ``magr-gptq``, ``magr-rtn``, ``nf``).
    bits: 2, 3, 4 or 8 (``nf``: 4 or 2). group_size: inputs per scale (``-1``: per output channel; NF block size).
    sym: symmetric grid. clip_search: MSE range search of every group's scale and zero -- a property of the uniform
    grid, shared by RTN, GPTQ and both MagR pairings and read by the inits that quantize the base themselves.
    targets: linear names (suffixes such as ``q_proj``) to quantize; default all of the architecture's groups.
    options: the method's own settings, an instance of the options class it was registered with
    (``GPTQOptions``: ``act_order``, ``static_groups``, ``group_params``, ``damp``, ``block_size``; MagR's:
    ``magr_alpha``, ``magr_iters``, ``magr_solver``; ``magr-gptq`` has both; ``rtn`` and ``nf`` none). Given as a
    mapping (``quant: {method: magr-gptq, options: {magr_iters: 10}}``, ``quant.options.magr_iters=10``) it is
    converted and checked against that class; unset options keep the method's defaults.
    """

    method: str = "gptq"
    bits: int = 4
    group_size: int = 64
    sym: bool = False
    clip_search: bool = False
    targets: list[str] | None = None
    options: Any = None

    # Settings that were top-level fields before the options moved beside their method (recipes are told so).
    MOVED_KEYS = {k: f"options.{k}" for k in ("act_order", "static_groups", "group_params", "damp", "block_size",
                                               "magr_alpha", "magr_iters", "magr_solver")}

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
        self.options = build_options(QUANTIZERS, "method", self.method, self.options)
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if self.targets is not None and not self.targets:
            raise ValueError("targets is empty; name at least one linear (e.g. ['q_proj']) or leave it unset (all)")

    @staticmethod
    def methods() -> dict[str, tuple[int, ...]]:
        """The registered quantizers and the bit widths each takes, for front ends that list them."""
        return {name: q.bits for name, q in sorted(QUANTIZERS.items())}

    @staticmethod
    def option_fields() -> dict[str, tuple[dataclasses.Field, type, list[str]]]:
        """Every registered quantizer option once, for front ends that list them: name -> (its field, an options
        class holding it, the methods that take it)."""
        out: dict[str, tuple[dataclasses.Field, type, list[str]]] = {}
        for name, q in sorted(QUANTIZERS.items()):
            for f in fields(q.options) if q.options is not None else ():
                out.setdefault(f.name, (f, q.options, []))[2].append(name)
        return out

    @property
    def needs_calibration(self) -> bool:
        return QUANTIZERS[self.method].needs_calibration

    def quantize(self, W: torch.Tensor, H: torch.Tensor | None) -> QuantizedWeight:
        """Quantize one ``(out, in)`` weight with this configuration (``H``: ``(in, in)`` or ``None``)."""
        return QUANTIZERS[self.method].fn(W, H, self)

    def to_dict(self) -> dict:
        """Plain nested dict (``options`` a dict, or ``None`` for a method without options)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        """Rebuild from :meth:`to_dict` output, also of older lowbit versions: their flat format (``act_order``,
        ``magr_iters``, ... at top level, every method's settings in every file) has the method's own settings
        moved into ``options`` and the others dropped; an empty ``extra`` of still older files is dropped."""
        d = dict(d)
        if d.get("extra") == {}:
            d.pop("extra")
        valid = {f.name for f in fields(cls)}
        d = split_legacy(d, valid, QUANTIZERS, d.get("method", cls.method), "options")
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(f"unknown quantization setting(s) {unknown}; valid: {sorted(valid)}")
        return cls(**d)
