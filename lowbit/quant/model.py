"""Model-level quantization driver: the sequential, layer-by-layer calibration loop (GPTQ paper §4, reference
IST-DASLab/gptq ``llama.py``), generic over architectures through a small data table.

The inputs of decoder layer 0 are captured once on the calibration samples. Then, for each decoder layer, its
linears are quantized in sequential groups (``[q,k,v] → [o] → [gate,up] → [down]`` for LLaMA): the layer is run
on the calibration inputs with the earlier groups already quantized, ``H = Σ X^T X`` is accumulated for the
group's linears by forward hooks, the linears are quantized and replaced by :class:`QuantLinear`, and finally the
fully quantized layer produces the next layer's inputs. Only one decoder layer's activations and Hessians are
alive at a time.

Two shortcuts keep the passes cheap without changing what they compute: a group's pass stops once its linears have
seen their inputs (q/k/v need nothing past the input norm), and the last group (``down_proj``, whose output is added
to the residual stream) keeps its pass's outputs, so the next layer's inputs are ``out - down(x) + Q_down(x)``
instead of one more forward.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from . import calibrate as cal
from .arch import arch_spec, set_submodule, target_groups
from .config import QuantConfig
from .gptq import output_error
from .qlinear import QuantLinear
from .streaming import finish_streaming

log = logging.getLogger(__name__)


OnLinear = Callable[[int, str, nn.Module, QuantLinear, "torch.Tensor | None"], nn.Module]


def quantize_linear(linear: nn.Linear, cfg: QuantConfig, H: torch.Tensor | None) -> tuple[QuantLinear, dict]:
    """Quantize one ``nn.Linear`` -> (``QuantLinear``, stats)."""
    W = linear.weight.detach().float()
    t0 = time.perf_counter()
    qw = cfg.quantize(W, H)
    dt = time.perf_counter() - t0
    Q = qw.dequantize()
    stats = {"rel_weight_error": float((W - Q).norm() / W.norm().clamp(min=1e-30)), "time_s": dt}
    if H is not None:
        stats["rel_output_error"] = output_error(W, Q, H)
    bias = linear.bias.detach() if linear.bias is not None else None
    return QuantLinear.from_quantized(qw, bias=bias), stats


#: Above this many bytes of kept tensors (the last group's inputs and outputs for every calibration sample) the
#: residual shortcut is off and the quantized layer runs once more instead: 128 x 2048 tokens of LLaMA-2-7B would
#: keep ≈ 20 GB; SmolLM2-135M at 32 x 512 keeps ≈ 0.18 GB.
SHORTCUT_MAX_BYTES = 1 << 30
CALL_TOKENS = 4096


def quantize_model(model: nn.Module, config: QuantConfig, calibration: torch.Tensor | None = None,
                   progress: bool = True, on_linear: OnLinear | None = None,
                   precomputed: dict[str, QuantLinear] | None = None, store_dtype: torch.dtype | None = None,
                   shortcut_max_bytes: int = SHORTCUT_MAX_BYTES) -> list[dict]:
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
    store_dtype: keep the calibration activations between layers in this dtype (e.g. ``torch.bfloat16``: half the
        memory of float32; each layer still computes in its own dtype, so only the inputs are rounded).
    shortcut_max_bytes: the residual shortcut's memory bound (:data:`SHORTCUT_MAX_BYTES`); ``0`` turns it off.

    A model from :func:`~lowbit.quant.streaming.load_streaming` has its decoder layers on the meta device: each is
    read from the checkpoint when its turn comes (``model.lowbit_layer_loader``).
    """
    from tqdm.auto import tqdm

    spec = arch_spec(model)
    groups = target_groups(spec, config.targets)
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
        hidden, kwargs_list = cal.capture_layer_inputs(model, layers, calibration)
        hidden = _store(hidden, store_dtype)
    loader = getattr(model, "lowbit_layer_loader", None)
    # Samples per layer call: 8 up to 512 tokens each, fewer for longer ones (a call's activations scale with its
    # tokens: 8 x 2048 tokens of LLaMA-2-7B would be ≈ 4 GB at once).
    bs = max(1, min(8, CALL_TOKENS // calibration.shape[1])) if calibration is not None else 8

    bar = tqdm(range(len(layers)), desc=f"quantize {config.method} {config.bits}-bit", disable=not progress)
    for i in bar:
        layer = layers[i]
        if loader is not None:
            loader(i, layer)
        calls, replaced = None, {}
        for gi, group in enumerate(groups):
            linears = {name: layer.get_submodule(name) for name in group}
            Hs = {name: None for name in group}
            if hidden is not None:
                if (gi == len(groups) - 1 and set(group) <= set(spec.residual)
                        and _kept_bytes(hidden, linears) <= shortcut_max_bytes):
                    Hs, calls = cal.collect_hessians_and_outputs(layer, linears, hidden, kwargs_list, bs)
                else:
                    Hs = cal.collect_hessians(layer, linears, hidden, kwargs_list, bs)
            for name, lin in linears.items():
                full = f"{spec.layers}.{i}.{name}"
                if precomputed is not None and full in precomputed:
                    _check_h(i, name, Hs[name])
                    qlin = precomputed[full]
                    W, Q = lin.weight.detach().float(), qlin.dequantize(torch.float32)
                    stats = {"rel_weight_error": float((W - Q).norm() / W.norm().clamp(min=1e-30)), "time_s": 0.0}
                    if Hs[name] is not None:
                        stats["rel_output_error"] = output_error(W, Q, Hs[name])
                else:
                    _check_h(i, name, Hs[name])
                    try:
                        qlin, stats = quantize_linear(lin, config, Hs[name])
                    except ValueError as e:  # the quantizer does not know which layer it was given
                        raise ValueError(f"layer {i} {name}: {e}") from e
                qlin.to(lin.weight.device)
                new = on_linear(i, name, lin, qlin, Hs[name]) if on_linear is not None else qlin
                set_submodule(layer, name, new)
                replaced[name] = new
                rec = {"layer": i, "module": name, "shape": list(lin.weight.shape), **stats}
                report.append(rec)
                log.info("layer %d %-18s rel. output error %s  weight error %.4f  (%.2fs)", i, name,
                         f"{stats['rel_output_error']:.4f}" if "rel_output_error" in stats else "n/a",
                         stats["rel_weight_error"], stats["time_s"])
            del Hs
        if calls is not None:  # the last group's outputs enter by a residual sum: correct the pass's outputs
            hidden = _store(cal.replace_outputs(calls, {name: replaced[name] for name in groups[-1]}), store_dtype)
            del calls
        elif hidden is not None:
            hidden = _store(cal.run_layer(layer, hidden, kwargs_list, bs), store_dtype)
    if loader is not None:
        finish_streaming(model)
    model.train(was_training)
    model.lowbit_quant_config = config  # how the base was quantized, for messages (adapter base checks)
    return report


def _store(hidden: list[torch.Tensor], dtype: torch.dtype | None) -> list[torch.Tensor]:
    return hidden if dtype is None else [h.to(dtype) for h in hidden]


def _kept_bytes(hidden: list[torch.Tensor], linears: dict[str, nn.Module]) -> int:
    """Bytes the residual shortcut keeps: per sample the layer output and each linear's input and output, float32."""
    tokens = sum(h[..., 0].numel() for h in hidden)
    width = hidden[0].shape[-1] + sum(lin.in_features + lin.out_features for lin in linears.values())
    return tokens * width * 4


def _check_h(i: int, name: str, H: torch.Tensor | None) -> None:
    # NaN activations are the calibration pass's fault, not the checkpoint's (whose weights _check_dims checked).
    if H is not None and not bool(torch.isfinite(H).all()):
        raise ValueError(f"layer {i} {name}: the calibration activations reaching it are non-finite (H = X^T X holds "
                         f"NaN/Inf; the weights themselves are finite): an fp16/bf16 overflow, or NaN/Inf in earlier "
                         f"weights (embeddings, norms) or inputs; load the model in float32 and check it")


def _check_dims(layers: nn.ModuleList, groups: list[list[str]], cfg: QuantConfig) -> None:
    # Fail before any expensive work if the group size cannot tile a layer or a weight is corrupt.
    for i, layer in enumerate(layers):
        for name in (n for g in groups for n in g):
            lin = layer.get_submodule(name)
            if not isinstance(lin, nn.Linear):
                raise ValueError(f"layer {i} {name} is {type(lin).__name__}, not nn.Linear (already quantized?)")
            if not lin.weight.is_meta and not torch.isfinite(lin.weight).all():  # streamed: checked on loading
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
        set_submodule(model, name, lin)
    return model
