"""Model-level quantization driver: the sequential, layer-by-layer calibration loop (GPTQ paper §4, reference
IST-DASLab/gptq ``llama.py``), generic over architectures through a small data table.

The inputs of decoder layer 0 are captured once on the calibration samples. Then, for each decoder layer, its
linears are quantized in sequential groups (``[q,k,v] → [o] → [gate,up] → [down]`` for LLaMA): the layer is run
on the calibration inputs with the earlier groups already quantized, ``H = Σ X^T X`` is accumulated for the
group's linears by forward hooks, the linears are quantized and replaced by :class:`QuantLinear`, and finally the
fully quantized layer produces the next layer's inputs. Only one decoder layer's activations and Hessians are
alive at a time.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .gptq import gptq_quantize, output_error
from .magr import magr
from .nf import nf_quantize
from .qlinear import QuantLinear
from .qweight import SUPPORTED_BITS, QuantizedWeight
from .rtn import rtn_quantize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    """Where the decoder layers live and which of their linears form the sequential quantization groups."""

    layers: str
    groups: tuple[tuple[str, ...], ...]


_LLAMA = ArchSpec(
    layers="model.layers",
    groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
            ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
)
# LLaMA-architecture families share module names; add an entry here for a new architecture.
ARCHITECTURES: dict[str, ArchSpec] = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA}


def arch_spec(model: nn.Module) -> ArchSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {model_type!r}; supported: {sorted(ARCHITECTURES)} "
                         f"(add an ArchSpec to lowbit.quant.model.ARCHITECTURES for a LLaMA-like model)")
    return ARCHITECTURES[model_type]


# ---------------------------------------------------------------------------------------------------------------
# Methods: each maps (W, H, config) -> QuantizedWeight. A decorator binds the name to its handler and declares
# whether it needs calibration statistics.

@dataclass(frozen=True)
class _Method:
    fn: Callable[[torch.Tensor, torch.Tensor | None, QuantConfig], QuantizedWeight]
    needs_calibration: bool


METHODS: dict[str, _Method] = {}


def register_method(name: str, needs_calibration: bool):
    def deco(fn):
        METHODS[name] = _Method(fn, needs_calibration)
        return fn
    return deco


@dataclass
class QuantConfig:
    """How to quantize a model's decoder linears.

    method: ``rtn``, ``gptq``, ``magr-gptq``, ``magr-rtn`` or ``nf`` (NF4/NF2, bits 4 or 2).
    bits: 2, 3, 4 or 8. group_size: inputs per scale (``-1``: per output channel; NF block size).
    magr_alpha: MagR penalty (default 1e-3 per-channel, 1e-4 per-group, as in the paper).
    targets: linear names (suffixes such as ``q_proj``) to quantize; default all of the architecture's groups.
    """

    method: str = "gptq"
    bits: int = 4
    group_size: int = 64
    sym: bool = False
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    block_size: int = 128
    clip_search: bool = False
    magr_alpha: float | None = None
    magr_iters: int = 200
    targets: list[str] | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization method {self.method!r}; choose one of {sorted(METHODS)}")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {list(SUPPORTED_BITS)}, got {self.bits!r}")
        if self.method == "nf" and self.bits not in (2, 4):
            raise ValueError(f"method 'nf' supports bits 4 (NF4) and 2 (NF2), got {self.bits}")
        if self.group_size != -1 and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise ValueError(f"group_size must be a positive integer or -1 (per-channel), got {self.group_size!r}")
        if self.method == "nf" and self.group_size == -1:
            raise ValueError("method 'nf' needs a block size (group_size > 0, e.g. 64)")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {self.damp}")
        if self.magr_alpha is not None and self.magr_alpha <= 0:
            raise ValueError(f"magr_alpha must be > 0, got {self.magr_alpha}")

    @property
    def needs_calibration(self) -> bool:
        return METHODS[self.method].needs_calibration

    def to_dict(self) -> dict:
        return asdict(self)


@register_method("rtn", needs_calibration=False)
def _rtn(W, H, cfg: QuantConfig) -> QuantizedWeight:
    return rtn_quantize(W, cfg.bits, cfg.group_size, cfg.sym, cfg.clip_search)


@register_method("nf", needs_calibration=False)
def _nf(W, H, cfg: QuantConfig) -> QuantizedWeight:
    return nf_quantize(W, cfg.bits, cfg.group_size)


def _gptq(W, H, cfg: QuantConfig) -> QuantizedWeight:
    return gptq_quantize(W, H, cfg.bits, cfg.group_size, cfg.sym, cfg.act_order, cfg.damp, cfg.block_size,
                         cfg.static_groups, cfg.clip_search)


def _magr(W, H, cfg: QuantConfig) -> torch.Tensor:
    alpha = cfg.magr_alpha if cfg.magr_alpha is not None else (1e-3 if cfg.group_size == -1 else 1e-4)
    return magr(W, H, alpha=alpha, iters=cfg.magr_iters, group_size=cfg.group_size)


register_method("gptq", needs_calibration=True)(_gptq)


@register_method("magr-gptq", needs_calibration=True)
def _magr_gptq(W, H, cfg: QuantConfig) -> QuantizedWeight:
    qw = _gptq(_magr(W, H, cfg), H, cfg)
    qw.method = "magr-gptq"
    return qw


@register_method("magr-rtn", needs_calibration=True)
def _magr_rtn(W, H, cfg: QuantConfig) -> QuantizedWeight:
    qw = _rtn(_magr(W, H, cfg), H, cfg)
    qw.method = "magr-rtn"
    return qw


# ---------------------------------------------------------------------------------------------------------------

OnLinear = Callable[[int, str, nn.Module, QuantLinear, "torch.Tensor | None"], nn.Module]


class _StopForward(Exception):
    pass


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, calibration: torch.Tensor
                         ) -> tuple[list[torch.Tensor], list[dict]]:
    """Run the model up to decoder layer 0 on each calibration row ``(n, seqlen)``; returns the hidden states
    ``[(1, seqlen, hidden)]`` and the keyword arguments (rotary embeddings, masks) the layer received."""
    hidden, kwargs_list = [], []

    def hook(module, args, kwargs):
        hs = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(hs.detach())
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
        kwargs["use_cache"] = False
        kwargs_list.append(kwargs)
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = _model_device(model)
    try:
        with torch.no_grad():
            for row in calibration:
                try:
                    model(input_ids=row[None].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return hidden, kwargs_list


def _run_layer(layer: nn.Module, hidden: list[torch.Tensor], kwargs_list: list[dict], batch_size: int = 8
               ) -> list[torch.Tensor]:
    """Run ``layer`` on every captured sample, ``batch_size`` samples per call (the samples are unpadded windows
    of equal length, so they share masks and rotary embeddings); returns per-sample outputs."""
    outs = []
    with torch.no_grad():
        for s in range(0, len(hidden), batch_size):
            chunk = hidden[s: s + batch_size]
            if any(h.shape != chunk[0].shape for h in chunk):
                chunk_out = [layer(h, **kw) for h, kw in zip(chunk, kwargs_list[s: s + batch_size])]
                outs += [o[0] if isinstance(o, tuple) else o for o in chunk_out]
                continue
            o = layer(torch.cat(chunk), **kwargs_list[s])
            o = o[0] if isinstance(o, tuple) else o
            outs += list(o.split(chunk[0].shape[0]))
    return outs


def _targets_of(spec: ArchSpec, targets: list[str] | None) -> list[list[str]]:
    groups = [[n for n in grp if targets is None or n in targets or n.split(".")[-1] in targets]
              for grp in spec.groups]
    if targets is not None:
        known = {n for grp in spec.groups for n in grp} | {n.split(".")[-1] for grp in spec.groups for n in grp}
        unknown = [t for t in targets if t not in known]
        if unknown:
            raise ValueError(f"unknown target module(s) {unknown}; valid names: {sorted(known)}")
    return [g for g in groups if g]


def quantize_linear(linear: nn.Linear, cfg: QuantConfig, H: torch.Tensor | None) -> tuple[QuantLinear, dict]:
    """Quantize one ``nn.Linear`` -> (``QuantLinear``, stats)."""
    W = linear.weight.detach().float()
    t0 = time.perf_counter()
    qw = METHODS[cfg.method].fn(W, H, cfg)
    dt = time.perf_counter() - t0
    Q = qw.dequantize()
    stats = {"rel_weight_error": float((W - Q).norm() / W.norm().clamp(min=1e-30)), "time_s": dt}
    if H is not None:
        stats["rel_output_error"] = output_error(W, Q, H)
    bias = linear.bias.detach() if linear.bias is not None else None
    return QuantLinear.from_quantized(qw, bias=bias), stats


def quantize_model(model: nn.Module, config: QuantConfig, calibration: torch.Tensor | None = None,
                   progress: bool = True, on_linear: OnLinear | None = None,
                   precomputed: dict[str, QuantLinear] | None = None) -> list[dict]:
    """Quantize ``model``'s decoder linears in place, replacing them with :class:`QuantLinear`.

    Args:
        model: a Hugging Face causal LM of a supported architecture (see ``ARCHITECTURES``).
        config: the :class:`QuantConfig`.
        calibration: ``(nsamples, seqlen)`` token ids; required by calibrated methods (GPTQ, MagR), optional for
            RTN/NF (then used only to report output errors).
    Returns:
        One dict per quantized linear: ``layer``, ``module``, ``shape``, ``rel_weight_error``,
        ``rel_output_error`` (``‖X(W-Q)^T‖/‖XW^T‖`` on the calibration inputs, when available), ``time_s``.
    on_linear: called as ``on_linear(layer_index, name, linear, qlinear, H)`` after each linear is quantized, while
        its full-precision weight and ``H`` (``None`` without calibration) still exist; the module it returns
        replaces the linear, and the calibration inputs of later layers flow through it. This is how calibrated
        adapter initialisations (CLoQ, calibrated DiaBlo) share the one calibration pass.
    precomputed: ``{full module name: QuantLinear}`` already quantized with ``config`` (a cached base): those
        linears are taken as they are instead of being quantized again; ``H`` is still collected for them.
    """
    from tqdm.auto import tqdm

    spec = arch_spec(model)
    groups = _targets_of(spec, config.targets)
    if config.needs_calibration and calibration is None:
        raise ValueError(f"method {config.method!r} needs calibration data (token ids of shape (nsamples, seqlen))")
    if calibration is not None:
        if calibration.dim() != 2 or calibration.numel() == 0:
            raise ValueError(f"calibration must be a non-empty (nsamples, seqlen) tensor of token ids, got shape "
                             f"{tuple(calibration.shape)}")
    layers = model.get_submodule(spec.layers)
    _check_dims(layers, groups, config)
    report: list[dict] = []
    was_training = model.training
    model.eval()

    hidden = kwargs_list = None
    if calibration is not None:
        hidden, kwargs_list = capture_layer_inputs(model, layers, calibration)

    bar = tqdm(range(len(layers)), desc=f"quantize {config.method} {config.bits}-bit", disable=not progress)
    for i in bar:
        layer = layers[i]
        for group in groups:
            linears = {name: layer.get_submodule(name) for name in group}
            Hs = {name: None for name in group}
            if hidden is not None:
                Hs, handles = _hessian_hooks(linears)
                try:
                    _run_layer(layer, hidden, kwargs_list)
                finally:
                    for h in handles:
                        h.remove()
                Hs = {k: v[0] for k, v in Hs.items()}
            for name, lin in linears.items():
                full = f"{spec.layers}.{i}.{name}"
                if precomputed is not None and full in precomputed:
                    qlin = precomputed[full]
                    W, Q = lin.weight.detach().float(), qlin.dequantize(torch.float32)
                    stats = {"rel_weight_error": float((W - Q).norm() / W.norm().clamp(min=1e-30)), "time_s": 0.0}
                    if Hs[name] is not None:
                        stats["rel_output_error"] = output_error(W, Q, Hs[name])
                else:
                    qlin, stats = quantize_linear(lin, config, Hs[name])
                qlin.to(lin.weight.device)
                new = on_linear(i, name, lin, qlin, Hs[name]) if on_linear is not None else qlin
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, child, new)
                rec = {"layer": i, "module": name, "shape": list(lin.weight.shape), **stats}
                report.append(rec)
                log.info("layer %d %-18s rel. output error %s  weight error %.4f  (%.2fs)", i, name,
                         f"{stats['rel_output_error']:.4f}" if "rel_output_error" in stats else "n/a",
                         stats["rel_weight_error"], stats["time_s"])
            del Hs
        if hidden is not None:
            hidden = _run_layer(layer, hidden, kwargs_list)
    model.train(was_training)
    return report


def _hessian_hooks(linears: dict[str, nn.Module]):
    """Forward hooks accumulating ``H = Σ x^T x`` (float32) for each linear; returns ({name: [H]}, handles)."""
    Hs: dict[str, list] = {}
    handles = []
    for name, lin in linears.items():
        n = lin.in_features
        acc = [torch.zeros(n, n, dtype=torch.float32, device=lin.weight.device)]
        Hs[name] = acc

        def hook(module, inputs, output, acc=acc, n=n):
            x = inputs[0].detach().reshape(-1, n).float()
            acc[0].addmm_(x.t(), x)

        handles.append(lin.register_forward_hook(hook))
    return Hs, handles


def _check_dims(layers: nn.ModuleList, groups: list[list[str]], cfg: QuantConfig) -> None:
    # Fail before any expensive work if the group size cannot tile a layer or a weight is corrupt.
    for i, layer in enumerate(layers):
        for name in (n for g in groups for n in g):
            lin = layer.get_submodule(name)
            if not isinstance(lin, nn.Linear):
                raise ValueError(f"layer {i} {name} is {type(lin).__name__}, not nn.Linear (already quantized?)")
            if cfg.group_size != -1 and lin.in_features % cfg.group_size:
                raise ValueError(f"group_size {cfg.group_size} does not divide in_features {lin.in_features} of "
                                 f"{name}; use a divisor (e.g. {math.gcd(lin.in_features, 128)}) or -1 (per-channel)")
            if not torch.isfinite(lin.weight).all():
                raise ValueError(f"layer {i} {name} holds NaN/Inf weights; the checkpoint is corrupt — reload or "
                                 f"fix it before quantizing")


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every :class:`QuantLinear` of ``model`` (in place) with an ``nn.Linear`` holding its dequantised
    weight — the float base that tools without lowbit's layer (PEFT, lm-eval, vLLM) can load. Returns ``model``."""
    for name, q in list(quantized_modules(model).items()):
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, dtype=dtype,
                        device=q.qweight.device)
        with torch.no_grad():
            lin.weight.copy_(q.dequantize(dtype))
            if q.bias is not None:
                lin.bias.copy_(q.bias.to(dtype))
        lin.requires_grad_(False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)
    return model
