"""ApiQ-bw: block-wise joint initialisation of LoRA and the weight quantizer (Liao et al. 2024, "ApiQ: Finetuning of
2-Bit Quantized Large Language Model", arXiv 2402.05147; reference code BaohaoLiao/ApiQ).

Objective, per decoder block ``ℓ`` and in order ``ℓ = 0, 1, …``::

    min_{γ, β, A, B}  MSE( fp_block_ℓ(X_fp),  q_block_ℓ(X_q) )

where ``X_fp`` are the full-precision model's inputs to block ``ℓ`` and ``X_q`` the outputs of the already
quantized-and-adapted blocks ``0 … ℓ-1`` (so each block also learns to undo the error accumulated before it).
In ``q_block`` every quantized linear ``W`` ``(out, in)`` (``targets``) becomes ``Q(W; γ, β) + (α/r)·B @ A`` if it
also carries LoRA (``lora_targets``, a subset of ``targets``), else just ``Q(W; γ, β)``; the clipping of every
quantized linear and the LoRA factors of the adapted ones are trained jointly. The "ApiQ-bw 112M" setting of the
DiaBlo paper's comparison (Gurses et al. 2025, arXiv 2506.03230) is ``targets=None`` (all seven projections
quantized) with ``lora_targets=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]``:

- ``Q`` is uniform asymmetric per-(row, group) fake quantization with learnable weight clipping (LWC, from
  OmniQuant, Shao et al. 2023, arXiv 2308.13137): the range ``[xmin·σ(β), xmax·σ(γ)]`` with
  ``xmin = min(min w, 0)``, ``xmax = max(max w, 0)`` of the group, ``γ, β`` of shape ``(out, G)`` initialised to 4
  (σ(4) ≈ 0.982), straight-through rounding;
- ``A`` ``(r, in)`` is initialised Kaiming-uniform with ``a = √5`` and ``B`` ``(out, r)`` to zero. This is what
  the reference does: it wraps the model with PEFT's default ``LoraConfig`` (``init_lora_weights=True``) before
  calibrating, so the block starts as plain (slightly clipped) RTN.

Training: AdamW with two parameter groups (clipping lr 5e-3, LoRA lr 5e-4, both weight decay 0.1), 20 epochs
over the calibration samples in order, then the block is frozen (final quantization with the learned clipping,
LoRA fixed) and its outputs on ``X_q`` become the next block's ``X_q``.

Deliberate differences from the reference: the clipped range always contains 0 (``min(w, 0)``, ``max(w, 0)``,
lowbit's RTN convention) and the scale is fp16-representable (lowbit's storage), so σ(γ) = σ(β) = 1 is exactly
lowbit's RTN; training runs in float32 rather than fp16 autocast; a final partial batch is used, not dropped; the
frozen block propagates ``X_q`` with ``Q + s·B@A`` merged in float32. The reference's 2-bit script also adds an
auxiliary loss ``MSE(fp_block(X_q), q_block(X_q))`` (``--aug_loss``) and uses symmetric quantization; neither is
part of the block-wise objective above, and neither is implemented.

Layers: the clipping quantizer lives in :mod:`lowbit.adapters.lwc`; :func:`apiq_bw` is the model-level driver,
built on :mod:`lowbit.quant.calibrate`'s input capture and batched layer runs; the registered initialisation
``init="apiq-bw"`` puts its result into LoRA wrappers.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.arch import ArchSpec, arch_spec, set_submodule, target_groups
from ..quant.calibrate import capture_layer_inputs, run_layer
from ..quant.qweight import QuantizedWeight, check_bits
from .base import quantized_linear
from .lwc import LwcLoRALinear, dividing_group_size
from .registry import make_adapter, register_base_init

log = logging.getLogger(__name__)

def _to_float32(obj):
    """Cast the floating tensors in (nested tuples/dicts of) layer keyword arguments to float32."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_to_float32(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_float32(v) for k, v in obj.items()}
    return obj


def _mse(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum(F.mse_loss(x, y, reduction="sum") for x, y in zip(a, b)) / sum(x.numel() for x in a))


def _lora_names(spec: ArchSpec, names: list[str], targets: list[str] | None,
                lora_targets: list[str] | None) -> list[str]:
    """The subset of the quantized ``names`` that get LoRA; ``lora_targets`` must select only quantized linears."""
    if lora_targets is None:
        return list(names)
    if isinstance(lora_targets, str):
        raise ValueError(f"lora_targets must be a list of module names, got the string {lora_targets!r}; use "
                         f"[{lora_targets!r}]")
    selected = {n for grp in target_groups(spec, lora_targets) for n in grp}  # raises on unknown names
    quantized = set(names)
    every = [n for grp in spec.groups for n in grp]

    def within(t: str) -> bool:  # all linears t selects (rule of _targets_of: full name or last part) are quantized
        return all(n in quantized for n in every if n == t or n.split(".")[-1] == t)

    offending = [t for t in lora_targets if not within(t)]
    if offending:
        valid = sorted(quantized | {n.split(".")[-1] for n in quantized if within(n.split(".")[-1])})
        raise ValueError(f"lora_targets must be a subset of targets (LoRA only on quantized linears): "
                         f"{offending} not in targets={targets!r}; valid lora_targets names: {valid}")
    return [n for n in names if n in selected]


def _validate(model: nn.Module, calibration: torch.Tensor, bits: int, group_size: int, rank: int, alpha: float,
              targets: list[str] | None, lora_targets: list[str] | None, epochs: int, lrs: tuple[float, float],
              weight_decay: float, batch_size: int) -> tuple[nn.ModuleList, list[str], list[str]]:
    check_bits(bits)
    if isinstance(targets, str):
        raise ValueError(f"targets must be a list of module names, got the string {targets!r}; use [{targets!r}]")
    spec = arch_spec(model)
    names = [n for grp in target_groups(spec, targets) for n in grp]
    lora_names = _lora_names(spec, names, targets, lora_targets)
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.numel() == 0 \
            or calibration.is_floating_point():
        shape = tuple(calibration.shape) if isinstance(calibration, torch.Tensor) else type(calibration).__name__
        raise ValueError(f"calibration must be a non-empty (nsamples, seqlen) tensor of integer token ids, got "
                         f"{shape}" + (f" of dtype {calibration.dtype}" if isinstance(calibration, torch.Tensor)
                                       else ""))
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if min(lrs) < 0 or weight_decay < 0:
        raise ValueError(f"learning rates and weight_decay must be >= 0, got lr_lora={lrs[0]}, lr_clip={lrs[1]}, "
                         f"weight_decay={weight_decay}")
    layers = model.get_submodule(spec.layers)
    for i, layer in enumerate(layers):
        for name in names:
            lin = layer.get_submodule(name)
            if not isinstance(lin, nn.Linear):
                raise ValueError(f"layer {i} {name} is {type(lin).__name__}, not nn.Linear; ApiQ-bw needs the "
                                 f"full-precision model (already quantized or adapted?)")
            dividing_group_size(lin.in_features, group_size)
            if name in lora_names and rank >= min(lin.in_features, lin.out_features):
                raise ValueError(f"rank {rank} must be < min(in, out) = {min(lin.in_features, lin.out_features)} "
                                 f"of layer {i} {name} {tuple(lin.weight.shape)}; a full-rank LoRA is a dense update")
    return layers, names, lora_names


def apiq_bw(model: nn.Module, calibration: torch.Tensor, bits: int, group_size: int = 64, rank: int = 64,
            alpha: float = 16.0, targets: list[str] | None = None, epochs: int = 20, lr_lora: float = 5e-4,
            lr_clip: float = 5e-3, weight_decay: float = 0.1, batch_size: int = 1, progress: bool = True,
            seed: int = 0, *, lora_targets: list[str] | None = None,
            ) -> dict[str, tuple[QuantizedWeight, torch.Tensor | None, torch.Tensor | None]]:
    """ApiQ-bw initialisation of the quantized weights of every target linear of ``model`` and of the LoRA factors
    of those among them in ``lora_targets``.

    Args:
        model: full-precision Hugging Face causal LM of a LLaMA-like architecture (``nn.Linear`` projections);
            left unchanged (the blocks are trained on float32 copies).
        calibration: ``(nsamples, seqlen)`` token ids.
        bits, group_size: the uniform asymmetric quantizer (group_size -1: one group per row).
        rank, alpha: LoRA rank ``r`` (< min(in, out) of every LoRA target) and scaling numerator (``s = alpha/r``).
        targets: linear names or suffixes (e.g. ``["q_proj", "v_proj"]``) that are quantized with learnable
            clipping; ``None`` = all seven projections. Other linears stay full precision in the calibrated blocks.
        lora_targets: names or suffixes of the linears that also get LoRA ``A, B``; must select a subset of
            ``targets`` (``ValueError`` otherwise); ``None`` = the same as ``targets``. The clipping of every
            quantized linear and the LoRA of the adapted ones are trained jointly in each block. The paper's
            setting (DiaBlo table, "ApiQ-bw 112M") is ``targets=None,
            lora_targets=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]``.
        epochs, lr_lora, lr_clip, weight_decay, batch_size: AdamW training per block (samples in order).
        progress: show a tqdm bar over the blocks. seed: seed of the Kaiming-uniform draw of ``A``.
    Returns:
        ``{full module name: (Q, A, B)}`` for every quantized linear (``targets``), with ``Q`` the
        :class:`QuantizedWeight` ``(out, in)``; for a linear in ``lora_targets`` ``A`` ``(r, in)`` and ``B``
        ``(out, r)`` are float32 on the layer's device, in PEFT units: ``Q.dequantize() + (alpha/r)·B @ A`` is the
        learned effective weight (A and B were trained under the scaling, so no rescaling is needed); for a
        linear without LoRA ``A = B = None`` and ``Q.dequantize()`` alone is the learned weight.
    """
    from tqdm.auto import tqdm

    layers, names, lora_names = _validate(model, calibration, bits, group_size, rank, alpha, targets, lora_targets,
                                          epochs, (lr_lora, lr_clip), weight_decay, batch_size)
    spec = arch_spec(model)
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        hidden, kwargs_list = capture_layer_inputs(model, layers, calibration)
    finally:
        model.train(was_training)
    kwargs_list = [_to_float32(kw) for kw in kwargs_list]
    fp_in = [h.float() for h in hidden]  # nsamples × (1, seqlen, hidden)
    q_in = fp_in
    result: dict[str, tuple[QuantizedWeight, torch.Tensor | None, torch.Tensor | None]] = {}

    bar = tqdm(range(len(layers)), desc=f"ApiQ-bw {bits}-bit", disable=not progress)
    for i in bar:
        # Work on a float32 copy: the model itself is never modified.
        block = copy.deepcopy(layers[i]).float().eval().requires_grad_(False)
        fp_out = run_layer(block, fp_in, kwargs_list, batch_size)
        adapted = {}
        for name in names:
            adapted[name] = LwcLoRALinear(block.get_submodule(name), bits, group_size, rank, alpha, generator,
                                           lora=name in lora_names)
            set_submodule(block, name, adapted[name])
        mse_start = _mse(run_layer(block, q_in, kwargs_list, batch_size), fp_out)

        if epochs > 0:
            lora_params = [p for m in adapted.values() if m.lora_A is not None for p in (m.lora_A, m.lora_B)]
            groups = [{"params": [p for m in adapted.values() for p in (m.gamma, m.beta)], "lr": lr_clip}]
            if lora_params:
                groups.append({"params": lora_params, "lr": lr_lora})
            optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
            for _ in range(epochs):
                for s in range(0, len(q_in), batch_size):
                    out = block(torch.cat(q_in[s: s + batch_size]), **kwargs_list[s])
                    out = out[0] if isinstance(out, tuple) else out
                    loss = F.mse_loss(out, torch.cat(fp_out[s: s + batch_size]))
                    if not torch.isfinite(loss):
                        raise RuntimeError(f"ApiQ-bw loss became {loss.item()} in block {i}; lower lr_clip/lr_lora")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
            del optimizer

        for name, m in adapted.items():
            result[f"{spec.layers}.{i}.{name}"] = m.freeze()
        q_in = run_layer(block, q_in, kwargs_list, batch_size)
        mse_end = _mse(q_in, fp_out)
        log.info("ApiQ-bw block %d: output MSE %.4e -> %.4e (%.1f%% lower)", i, mse_start, mse_end,
                 100 * (1 - mse_end / mse_start) if mse_start > 0 else 0.0)
        bar.set_postfix(mse=f"{mse_start:.2e}->{mse_end:.2e}")
        fp_in = fp_out
        del block, adapted
    return result


def check_apiq_quant(quant) -> None:
    """ApiQ-bw's quantizer is its own asymmetric learnable clipping: refuse settings it would ignore."""
    if quant.sym:
        raise ValueError("init 'apiq-bw' learns an asymmetric clipped range (ApiQ's learnable weight clipping); "
                         "quant.sym=true is not implemented: set quant.sym=false (or use init=loftq or cloq)")
    if quant.clip_search:
        raise ValueError("init 'apiq-bw' learns its clipping range by gradient descent, so quant.clip_search=true "
                         "would be ignored: set quant.clip_search=false")


@dataclass(frozen=True)
class ApiQOptions:
    """``adapter.init_options`` of ``init=apiq-bw``: the block-wise optimisation (defaults of Liao et al. 2024)."""

    apiq_epochs: int = field(default=20, metadata={"help": "epochs over the calibration samples per block"})
    apiq_lr_lora: float = field(default=5e-4, metadata={"help": "AdamW learning rate of the LoRA factors"})
    apiq_lr_clip: float = field(default=5e-3, metadata={"help": "AdamW learning rate of the clipping"})
    apiq_weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})

    def __post_init__(self) -> None:
        if not isinstance(self.apiq_epochs, int) or self.apiq_epochs < 0:
            raise ValueError(f"apiq_epochs must be an integer >= 0, got {self.apiq_epochs!r}")
        if min(self.apiq_lr_lora, self.apiq_lr_clip, self.apiq_weight_decay) < 0:
            raise ValueError(f"apiq_lr_lora, apiq_lr_clip and apiq_weight_decay must be >= 0, got "
                             f"{self.apiq_lr_lora}, {self.apiq_lr_clip}, {self.apiq_weight_decay}")


@register_base_init("apiq-bw", adapters=("lora",), needs_calibration=True, quantizers=("rtn",),
                    check_quant=check_apiq_quant, options=ApiQOptions)
def _apiq_bw_init(model: nn.Module, names: list[str], cfg, options: ApiQOptions, quant, calibration: torch.Tensor,
                  progress: bool) -> list[dict]:
    """Every linear ``quant`` covers learns its clipping; only the adapter targets carry LoRA."""
    res = apiq_bw(model, calibration, quant.bits, group_size=quant.group_size, rank=cfg.rank, alpha=cfg.alpha,
                  targets=quant.targets, lora_targets=list(cfg.targets), epochs=options.apiq_epochs,
                  lr_lora=options.apiq_lr_lora, lr_clip=options.apiq_lr_clip,
                  weight_decay=options.apiq_weight_decay, progress=progress)
    root = math.sqrt(cfg.alpha / cfg.rank)  # apiq_bw's factors are for the plain alpha/r scaling
    adapted = set(names)
    for name, (qw, A, B) in res.items():
        qlin = quantized_linear(qw, model.get_submodule(name))
        if name in adapted:
            w = make_adapter(qlin, cfg)
            w.set_delta(A * root, B * root)
            set_submodule(model, name, w)
        else:
            set_submodule(model, name, qlin)
    return []
