"""Model-level driver: wrap a causal LM's projections with adapters and initialise them.

:func:`apply_adapters` resolves the target names against the architecture table of :mod:`lowbit.quant.arch`,
validates everything that depends on the model before any expensive work, and runs the registered initialisation
(see :mod:`lowbit.adapters.registry`) by its kind, each called one way:

- per-linear inits (:class:`~lowbit.adapters.registry.LinearInit`: ``default``; ``cloq`` for LoRA, Deng et al. 2025;
  ``calibrated`` for DiaBlo) run inside :func:`~lowbit.quant.model.quantize_model`'s sequential calibration pass,
  which provides ``W``, ``Q`` and ``H = X^T X``: the calibration data flows through the model once and later layers
  see the adapted outputs of earlier ones; without a quantizer the wrappers go on the linears as they are;
- inits that quantize the base themselves (:class:`~lowbit.adapters.registry.BaseInit`: ``loftq``, Li et al. 2023;
  ``apiq-bw``, Liao et al. 2024) get the model.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..quant import QuantConfig, quantize_model, quantized_modules
from ..quant.arch import arch_spec, resolve_targets, set_submodule
from ..quant.qlinear import QuantLinear
from .base import AdapterLayer
from .config import AdapterConfig
from .registry import ADAPTERS, INITS, BaseInit, LinearInit, make_adapter

log = logging.getLogger(__name__)


def check_targets(model: nn.Module, names: list[str], cfg: AdapterConfig) -> bool:
    """Check that every target can take ``cfg``'s adapter; returns whether the targets are float ``nn.Linear``."""
    cls = ADAPTERS[cfg.adapter]
    kinds = set()
    for name in names:
        m = model.get_submodule(name)
        if isinstance(m, AdapterLayer):
            raise ValueError(f"{name} already carries an adapter ({type(m).__name__}); load a fresh model")
        if not isinstance(m, (nn.Linear, QuantLinear)):
            raise ValueError(f"{name} is a {type(m).__name__}; adapters wrap nn.Linear or QuantLinear layers")
        kinds.add(isinstance(m, QuantLinear))
        cls.check_base(name, m, cfg)
    if len(kinds) > 1:
        raise ValueError("the targets mix float and quantized layers; quantize all of them or none")
    return kinds == {False}


def _validate(model: nn.Module, cfg: AdapterConfig, calibration, quant: QuantConfig | None) -> list[str]:
    """The model-dependent checks (the config's own values were checked by ``AdapterConfig``)."""
    names = resolve_targets(model, cfg.targets)
    is_float = check_targets(model, names, cfg)
    init = INITS[cfg.init]
    if init.needs_float_weights:
        if not is_float:
            raise ValueError(f"init {cfg.init!r} needs the full-precision weights, but the model is already "
                             f"quantized; load the float model and pass quant=QuantConfig(...)")
        if quant is None:
            raise ValueError(f"init {cfg.init!r} corrects a quantization error: pass quant=QuantConfig(...) "
                             f"(e.g. method='gptq', bits=2)")
    if quant is not None and not is_float:
        raise ValueError("the model is already quantized; pass quant=None to adapt it as it is")
    if init.needs_calibration and calibration is None:
        raise ValueError(f"init {cfg.init!r} needs calibration data: token ids of shape (nsamples, seqlen)")
    if quant is not None and init.needs_float_weights:
        if quant.targets and not set(names) <= set(resolve_targets(model, quant.targets)):
            raise ValueError(f"init {cfg.init!r} needs every adapted layer quantized; quant.targets "
                             f"{quant.targets} misses some of {cfg.targets}")
    cfg.check_quant(quant)
    return names


def apply_adapters(model: nn.Module, config: AdapterConfig, calibration: torch.Tensor | None = None,
                   quant: QuantConfig | None = None, progress: bool = True,
                   quantized_base: nn.Module | None = None) -> dict:
    """Wrap ``model``'s target projections with adapters (in place), quantizing first when ``quant`` is given.

    Args:
        model: a Hugging Face causal LM of a supported architecture; float (then ``quant`` may quantize it) or
            already quantized with :func:`~lowbit.quant.model.quantize_model` (then only inits that need no
            full-precision weights, such as ``default``).
        config: the :class:`AdapterConfig`.
        calibration: ``(nsamples, seqlen)`` token ids, needed by calibrated inits (``cloq``, ``calibrated``,
            ``apiq-bw``) and by calibrated quantizers (GPTQ, MagR).
        quant: how to quantize the base (``None``: keep the model's linears as they are).
        quantized_base: the same model already quantized with ``quant`` (e.g. loaded from a cache with
            ``load_quantized``); its packed layers are reused (shared, not copied) instead of quantizing again,
            while ``H`` for the calibrated inits is still collected from ``model``'s full-precision pass. Not used
            by inits that quantize the base themselves (``loftq``, ``apiq-bw``).
    Returns:
        A report: ``trainable``, ``base_params``, ``percent``, ``modules`` (count), ``quant_report``.
    Everything except the adapter parameters is frozen.
    """
    names = _validate(model, config, calibration, quant)
    init = INITS[config.init]
    was_training = model.training
    quant_report: list[dict] = []
    if isinstance(init, BaseInit):
        quant_report = init.fn(model, names, config, config.init_options, quant, calibration, progress)
    elif quant is not None:
        quant_report = _quantize_and_wrap(model, names, config, init, quant, calibration, progress, quantized_base)
    # Targets left as they are: no quantizer, or ones the quantizer does not cover (per-linear inits that need
    # the full-precision weights were checked to be covered).
    for name in names:
        base = model.get_submodule(name)
        if not isinstance(base, AdapterLayer):
            set_submodule(model, name, _wrap(init, base, config, None, None, None))

    for p in model.parameters():
        p.requires_grad_(False)
    for m in adapter_modules(model).values():
        for p in m.trainable_parameters():
            p.requires_grad_(True)
    model.train(was_training)
    model.lowbit_adapter_config = config
    if quant is not None:
        model.lowbit_quant_config = quant  # how the base was quantized (names it in adapter base checks)
    counts = count_parameters(model)
    log.info("adapters: %s (%s init) on %d modules: %s trainable parameters = %.3f%% of the base's %s",
             ADAPTERS[config.adapter].summary(config), config.init, len(names), f"{counts['trainable']:,}",
             counts["percent"], f"{counts['base_params']:,}")
    return {**counts, "modules": len(names), "quant_report": quant_report}


def _wrap(init: LinearInit, base: nn.Module, config: AdapterConfig, W: torch.Tensor | None, Q: torch.Tensor | None,
          H: torch.Tensor | None) -> AdapterLayer:
    """``base`` wrapped in a fresh adapter, initialised by the per-linear ``init`` (the one call of its ``fn``)."""
    w = make_adapter(base, config)
    init.fn(w, W, Q, H, config, config.init_options)
    return w


def _quantize_and_wrap(model: nn.Module, names: list[str], config: AdapterConfig, init: LinearInit,
                       quant: QuantConfig, calibration: torch.Tensor | None, progress: bool,
                       quantized_base: nn.Module | None) -> list[dict]:
    """Quantize with ``quant``; each target is wrapped (and a per-linear init run) as soon as it is quantized."""
    layers_name = arch_spec(model).layers
    targets = set(names)

    def on_linear(i: int, rel: str, lin: nn.Module, qlin: QuantLinear, H: torch.Tensor | None) -> nn.Module:
        if f"{layers_name}.{i}.{rel}" not in targets:
            return qlin
        W = Q = None
        if init.needs_float_weights:
            W, Q = lin.weight.detach().float(), qlin.dequantize(torch.float32)
        return _wrap(init, qlin, config, W, Q, H)

    pre = None
    if quantized_base is not None:
        device = next(model.parameters()).device
        # Shared, not copied: packed layers are frozen, and a copy would hold the packed model twice.
        pre = {n: m.to(device) for n, m in quantized_modules(quantized_base).items()}
        if not pre:
            raise ValueError("quantized_base holds no QuantLinear layers")
    return quantize_model(model, quant, calibration, progress=progress, on_linear=on_linear, precomputed=pre)


def adapter_modules(model: nn.Module) -> dict[str, AdapterLayer]:
    """``{module name: adapter wrapper}`` of every adapter attached to ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def count_parameters(model: nn.Module) -> dict:
    """``trainable`` (adapter) parameters, ``base_params`` (everything else, a quantized weight counted as its
    ``in·out`` logical entries) and ``percent`` = trainable / base."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            frozen += m.in_features * m.out_features + (m.bias.numel() if m.bias is not None else 0)
    return {"trainable": trainable, "base_params": frozen,
            "percent": 100.0 * trainable / frozen if frozen else float("nan")}


def expected_trainable(shapes: list[tuple[int, int]], adapter: str, rank: int = 64, num_blocks: int = 64) -> int:
    """The published formulas over ``(in, out)`` shapes, as the sizes of the adapter's stored trainable tensors:
    LoRA ``Σ r(in+out)``, DiaBlo ``Σ N·⌈in/N⌉·⌈out/N⌉`` (``= Σ in·out/N`` when ``N`` divides both), QWHA
    ``Σ r(in+out)`` coefficients (its stored positions are not trained)."""
    cfg = AdapterConfig(adapter=adapter, rank=rank, num_blocks=num_blocks)
    cls = ADAPTERS[adapter]
    return sum(math.prod(s) for i, o in shapes for k, s in cls.state_shapes(i, o, cfg).items()
               if k in cls.stored_params)


class without_adapters:
    """Context manager: the adapter wrappers are temporarily replaced by their bases (to save the quantized base
    alone with :func:`~lowbit.quant.serialization.save_quantized`), and put back on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.saved: dict[str, nn.Module] = {}

    def __enter__(self) -> nn.Module:
        self.saved = adapter_modules(self.model)
        for name, m in self.saved.items():
            set_submodule(self.model, name, m.base)
        return self.model

    def __exit__(self, *exc) -> None:
        for name, m in self.saved.items():
            set_submodule(self.model, name, m)
