"""Model-level driver: wrap a causal LM's projections with adapters, initialise them, save and load them.

``apply_adapters`` resolves target names against the architecture table of :mod:`lowbit.quant.model`, validates
everything before any expensive work, and runs the chosen initialisation:

- ``default``: LoRA ``A`` Kaiming-uniform, ``B = 0``; DiaBlo blocks zero (QLoRA, GPTQ-LoRA, DiaBlo).
- ``cloq`` (LoRA) / ``calibrated`` (DiaBlo): closed forms from ``W``, ``Q`` and ``H = X^T X``; ``H`` is collected
  inside :func:`~lowbit.quant.model.quantize_model`'s sequential calibration pass, so calibration data flows
  through the model once and later layers see the adapted outputs of earlier ones.
- ``loftq`` (LoRA): alternating quantization + SVD per layer, data-free; the quantizer is ``quant.method``
  (``nf`` or ``rtn``).
- ``apiq-bw`` (LoRA): block-wise joint optimisation of LoRA and the quantizer's clipping on calibration data.

Storage follows PEFT: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` (``peft.PeftModel.from_pretrained`` loads LoRA adapters onto the
dequantised base); DiaBlo uses the same layout with ``peft_type = "LOWBIT_DIABLO"`` and keys
``base_model.model.<module>.diablo_blocks``; ``lowbit_adapter.json`` records lowbit's full config.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..io import atomic_dir, atomic_write_json
from ..quant.model import QuantConfig, arch_spec, quantize_model
from ..quant.qlinear import QuantLinear
from .cloq import cloq_init
from .diablo import DiaBloLinear, block_shape
from .diablo_calibrated import diablo_calibrated_init
from .loftq import loftq_init
from .lora import LoRALinear

log = logging.getLogger(__name__)

ADAPTERS = ("lora", "diablo")
INITS = {"lora": ("default", "cloq", "loftq", "apiq-bw"), "diablo": ("default", "calibrated")}
CALIBRATED_INITS = ("cloq", "calibrated", "apiq-bw")
FULL_PRECISION_INITS = ("cloq", "calibrated", "loftq", "apiq-bw")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_DIABLO_TYPE = "LOWBIT_DIABLO"


@dataclass
class AdapterConfig:
    """Which adapter, where, and how it starts.

    adapter: ``lora`` or ``diablo``. init: ``default`` | ``cloq`` | ``loftq`` | ``apiq-bw`` (LoRA);
    ``default`` | ``calibrated`` (DiaBlo). rank/alpha/rslora: LoRA (scaling ``alpha/rank``, or
    ``alpha/sqrt(rank)``). num_blocks: DiaBlo ``N``. targets: projection names (suffixes such as ``q_proj``).
    damp: relative damping of ``H`` for the closed forms. loftq_iters: LoftQ alternations. apiq_*: ApiQ-bw
    optimisation settings (METHODS.md §2 defaults).
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
            raise ValueError(f"unknown adapter {self.adapter!r}; choose one of {ADAPTERS}")
        if self.init not in INITS[self.adapter]:
            hint = {"cloq": " (for DiaBlo use init='calibrated')", "calibrated": " (for LoRA use init='cloq')"}
            raise ValueError(f"init {self.init!r} is not available for {self.adapter}; choose one of "
                             f"{INITS[self.adapter]}{hint.get(self.init, '')}")
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

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def needs_calibration(self) -> bool:
        return self.init in CALIBRATED_INITS

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------------
# target resolution and validation

def resolve_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Full module names (``model.layers.3.self_attn.q_proj``) of the targets in every decoder layer."""
    spec = arch_spec(model)
    rel = [n for grp in spec.groups for n in grp]
    valid = sorted({n.split(".")[-1] for n in rel} | set(rel))
    unknown = [t for t in targets if t not in valid]
    if unknown:
        raise ValueError(f"unknown target module(s) {unknown}; this {type(model).__name__} has {valid}")
    layers = model.get_submodule(spec.layers)
    return [f"{spec.layers}.{i}.{n}" for i in range(len(layers)) for n in rel
            if n in targets or n.split(".")[-1] in targets]


def _make_wrapper(base: nn.Module, cfg: AdapterConfig) -> nn.Module:
    if cfg.adapter == "lora":
        return LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout, rslora=cfg.rslora)
    return DiaBloLinear(base, cfg.num_blocks, cfg.dropout)


def _check_shapes(model: nn.Module, names: list[str], cfg: AdapterConfig) -> bool:
    """Validate every target before work starts; returns whether the targets are float ``nn.Linear``."""
    kinds = set()
    for name in names:
        m = model.get_submodule(name)
        if isinstance(m, (LoRALinear, DiaBloLinear)):
            raise ValueError(f"{name} already carries an adapter ({type(m).__name__}); load a fresh model")
        if not isinstance(m, (nn.Linear, QuantLinear)):
            raise ValueError(f"{name} is a {type(m).__name__}; adapters wrap nn.Linear or QuantLinear layers")
        kinds.add(type(m) is QuantLinear)
        if cfg.adapter == "lora" and cfg.rank >= min(m.in_features, m.out_features):
            raise ValueError(f"LoRA rank {cfg.rank} must be < min(in, out) = {min(m.in_features, m.out_features)} "
                             f"of {name} ({m.out_features}x{m.in_features}); choose a smaller rank")
        if cfg.adapter == "diablo":
            block_shape(m.in_features, m.out_features, cfg.num_blocks)
    if len(kinds) > 1:
        raise ValueError("the targets mix float and quantized layers; quantize all of them or none")
    return kinds == {False}


def _validate(model: nn.Module, cfg: AdapterConfig, calibration, quant: QuantConfig | None) -> list[str]:
    names = resolve_targets(model, cfg.targets)
    is_float = _check_shapes(model, names, cfg)
    if cfg.init in FULL_PRECISION_INITS:
        if not is_float:
            raise ValueError(f"init {cfg.init!r} needs the full-precision weights, but the model is already "
                             f"quantized; load the float model and pass quant=QuantConfig(...)")
        if quant is None:
            raise ValueError(f"init {cfg.init!r} corrects a quantization error: pass quant=QuantConfig(...) "
                             f"(e.g. method='gptq', bits=2)")
    if quant is not None and not is_float:
        raise ValueError("the model is already quantized; pass quant=None to adapt it as it is")
    if cfg.needs_calibration and calibration is None:
        raise ValueError(f"init {cfg.init!r} needs calibration data: token ids of shape (nsamples, seqlen)")
    if quant is not None and quant.needs_calibration and calibration is None:
        raise ValueError(f"quantization method {quant.method!r} needs calibration data (nsamples, seqlen)")
    if calibration is not None and (calibration.dim() != 2 or calibration.numel() == 0):
        raise ValueError(f"calibration must be a non-empty (nsamples, seqlen) tensor of token ids, got shape "
                         f"{tuple(calibration.shape)}")
    if quant is not None:
        qnames = set(resolve_targets(model, quant.targets)) if quant.targets else None
        if cfg.init in ("cloq", "calibrated") and qnames is not None and not set(names) <= qnames:
            raise ValueError(f"init {cfg.init!r} needs every adapted layer quantized; quant.targets "
                             f"{quant.targets} misses some of {cfg.targets}")
        if cfg.init in ("loftq", "apiq-bw"):
            if qnames is not None and not set(names) <= qnames:
                raise ValueError(f"init {cfg.init!r} needs every adapted layer quantized; quant.targets "
                                 f"{quant.targets} misses some of {cfg.targets}")
            allowed = ("nf", "rtn") if cfg.init == "loftq" else ("rtn",)
            if quant.method not in allowed:
                raise ValueError(f"init {cfg.init!r} uses its own quantizer ({' or '.join(allowed)}); got "
                                 f"quant.method={quant.method!r}")
            if cfg.init == "loftq" and quant.group_size == -1 and quant.method == "nf":
                raise ValueError("LoftQ with NF needs a block size (quant.group_size > 0)")
    return names


# --------------------------------------------------------------------------------------------------------------
# the driver

def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _set_lora(w: LoRALinear, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
    """Load factors with ``B A ≈ target`` into a LoRA layer of ``scaling`` (split evenly: each / sqrt(s))."""
    s = math.sqrt(scaling)
    w.set_factors(A / s, B / s)


def apply_adapters(model: nn.Module, config: AdapterConfig, calibration: torch.Tensor | None = None,
                   quant: QuantConfig | None = None, progress: bool = True,
                   quantized_base: nn.Module | None = None) -> dict:
    """Wrap ``model``'s target projections with adapters (in place), quantizing first when ``quant`` is given.

    Args:
        model: a Hugging Face causal LM of a supported architecture; float (then ``quant`` may quantize it) or
            already quantized with :func:`~lowbit.quant.model.quantize_model` (then only ``default`` init).
        config: the :class:`AdapterConfig`.
        calibration: ``(nsamples, seqlen)`` token ids, needed by ``cloq``, ``calibrated``, ``apiq-bw`` and by
            calibrated quantizers (GPTQ, MagR).
        quant: how to quantize the base (``None``: keep the model's linears as they are).
        quantized_base: the same model already quantized with ``quant`` (e.g. loaded from a cache with
            ``load_quantized``); its packed layers are reused instead of quantizing again, while ``H`` for the
            calibrated inits is still collected from ``model``'s full-precision pass. Not used by ``loftq`` and
            ``apiq-bw``, which quantize with their own procedures.
    Returns:
        A report: ``trainable``, ``base_params``, ``percent``, ``modules`` (count), ``quant_report``.
    Everything except the adapter parameters is frozen.
    """
    names = _validate(model, config, calibration, quant)
    target_set = set(names)
    layers_name = arch_spec(model).layers
    quant_report: list[dict] = []
    was_training = model.training

    if config.init == "loftq":
        from tqdm.auto import tqdm

        qm = "nf" if quant.method == "nf" else "uniform"
        for name in tqdm(names, desc=f"LoftQ {quant.bits}-bit", disable=not progress):
            lin = model.get_submodule(name)
            hist: list[float] = []
            qw, A, B = loftq_init(lin.weight.detach().float(), quant.bits, config.rank, config.loftq_iters, qm,
                                  quant.group_size, history=hist)
            bias = lin.bias.detach() if lin.bias is not None else None
            w = _make_wrapper(QuantLinear.from_quantized(qw, bias=bias).to(lin.weight.device), config)
            _set_lora(w, A, B, w.scaling)
            _set(model, name, w)
            quant_report.append({"module": name, "loftq_error": hist})
        # The layers without an adapter get the same quantizer (LoftQ with B A = 0), so that every method of a
        # comparison runs on a fully quantized base.
        rest = _rest_targets(model, quant, target_set)
        if rest:
            quantize_model(model, dataclasses.replace(quant, targets=rest), progress=progress)
    elif config.init == "apiq-bw":
        from .apiq import apiq_bw

        # Every quantized projection learns its clipping; only the adapter targets carry LoRA.
        res = apiq_bw(model, calibration, quant.bits, group_size=quant.group_size, rank=config.rank,
                      alpha=config.alpha, targets=quant.targets, lora_targets=list(config.targets),
                      epochs=config.apiq_epochs, lr_lora=config.apiq_lr_lora, lr_clip=config.apiq_lr_clip,
                      weight_decay=config.apiq_weight_decay, progress=progress)
        ref_scaling = config.alpha / config.rank  # apiq_bw returns factors for the plain alpha/r scaling
        for name, (qw, A, B) in res.items():
            lin = model.get_submodule(name)
            bias = lin.bias.detach() if lin.bias is not None else None
            qlin = QuantLinear.from_quantized(qw, bias=bias).to(lin.weight.device)
            if name in target_set:
                w = _make_wrapper(qlin, config)
                _set_lora(w, A * math.sqrt(ref_scaling), B * math.sqrt(ref_scaling), w.scaling)
                _set(model, name, w)
            else:
                _set(model, name, qlin)
    elif quant is not None:
        def on_linear(i: int, rel: str, lin: nn.Module, qlin: QuantLinear, H: torch.Tensor | None) -> nn.Module:
            full = f"{layers_name}.{i}.{rel}"
            if full not in target_set:
                return qlin
            w = _make_wrapper(qlin, config)
            if config.init in ("cloq", "calibrated"):
                W = lin.weight.detach().float()
                Q = qlin.dequantize(torch.float32)
                if config.init == "cloq":
                    A, B = cloq_init(W, Q, H, config.rank, damp=config.damp)
                    _set_lora(w, A, B, w.scaling)
                else:
                    with torch.no_grad():
                        w.blocks.copy_(diablo_calibrated_init(W, Q, H, config.num_blocks, damp=config.damp))
            return w

        pre = None
        if quantized_base is not None:
            from ..quant.model import quantized_modules

            pre = {n: copy.deepcopy(m).to(next(model.parameters()).device)
                   for n, m in quantized_modules(quantized_base).items()}
            if not pre:
                raise ValueError("quantized_base holds no QuantLinear layers")
        quant_report = quantize_model(model, quant, calibration, progress=progress, on_linear=on_linear,
                                      precomputed=pre)
    else:
        for name in names:
            _set(model, name, _make_wrapper(model.get_submodule(name), config))

    for p in model.parameters():
        p.requires_grad_(False)
    for m in adapter_modules(model).values():
        for p in (m.lora_A, m.lora_B) if isinstance(m, LoRALinear) else (m.blocks,):
            p.requires_grad_(True)
    model.train(was_training)
    model.lowbit_adapter_config = config
    counts = count_parameters(model)
    log.info("adapters: %s (%s init) on %d modules: %s trainable parameters = %.3f%% of the base's %s",
             config.adapter, config.init, len(names), f"{counts['trainable']:,}", counts["percent"],
             f"{counts['base_params']:,}")
    return {**counts, "modules": len(names), "quant_report": quant_report}


def _rest_targets(model: nn.Module, quant: QuantConfig, adapted: set[str]) -> list[str]:
    """Relative names (``self_attn.o_proj``) of the linears ``quant`` covers that carry no adapter."""
    spec = arch_spec(model)
    wanted = quant.targets or [n for grp in spec.groups for n in grp]
    rest = {n[len(spec.layers) + 1:].split(".", 1)[1] for n in resolve_targets(model, wanted) if n not in adapted}
    return sorted(rest)


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, DiaBloLinear))}


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
    """The published formulas over ``(in, out)`` shapes: LoRA ``Σ r(in+out)``, DiaBlo ``Σ N·⌈in/N⌉·⌈out/N⌉``
    (``= Σ in·out/N`` when ``N`` divides both)."""
    if adapter == "lora":
        return sum(rank * (i + o) for i, o in shapes)
    return sum(num_blocks * math.ceil(i / num_blocks) * math.ceil(o / num_blocks) for i, o in shapes)


# --------------------------------------------------------------------------------------------------------------
# save / load

PEFT_PREFIX = "base_model.model."


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for name, m in adapter_modules(model).items():
        if isinstance(m, LoRALinear):
            state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().float().contiguous().cpu()
            state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().float().contiguous().cpu()
        else:
            state[f"{PEFT_PREFIX}{name}.diablo_blocks"] = m.blocks.detach().float().contiguous().cpu()
    return state


def save_adapter(model: nn.Module, out_dir: str | Path, config: AdapterConfig | None = None,
                 base_model_name_or_path: str | None = None, extra: dict | None = None) -> Path:
    """Write the adapter in PEFT layout to ``out_dir`` (atomically: a temp dir renamed into place)."""
    from safetensors.torch import save_file

    config = config or getattr(model, "lowbit_adapter_config", None)
    if config is None:
        raise ValueError("no AdapterConfig given and the model has none attached (was apply_adapters run?)")
    mods = adapter_modules(model)
    if not mods:
        raise ValueError("the model carries no lowbit adapters to save")
    if any(getattr(m, "merged", False) for m in mods.values()):
        raise ValueError("some adapters are merged into their base; unmerge() them before saving")
    base = base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None)
    shapes = {n: [m.out_features, m.in_features] for n, m in mods.items()}
    if config.adapter == "lora":
        peft_cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank, "lora_alpha": config.alpha,
                    "lora_dropout": config.dropout, "use_rslora": config.rslora,
                    "target_modules": sorted(config.targets), "bias": "none", "fan_in_fan_out": False,
                    "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": base}
    else:
        peft_cfg = {"peft_type": PEFT_DIABLO_TYPE, "task_type": "CAUSAL_LM", "num_blocks": config.num_blocks,
                    "dropout": config.dropout, "target_modules": sorted(config.targets),
                    "base_model_name_or_path": base}
    meta = {"format": "lowbit-adapter", "version": 1, "adapter": config.to_dict(), "module_shapes": shapes,
            **(extra or {})}
    with atomic_dir(out_dir) as tmp:
        save_file(_adapter_state(model), str(Path(tmp) / "adapter_model.safetensors"))
        atomic_write_json(Path(tmp) / "adapter_config.json", peft_cfg)
        atomic_write_json(Path(tmp) / "lowbit_adapter.json", meta)
    return Path(out_dir)


def read_adapter_config(adapter_dir: str | Path) -> AdapterConfig:
    """The :class:`AdapterConfig` stored in an adapter directory (PEFT LoRA directories from other tools too)."""
    d = Path(adapter_dir)
    if not (d / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{d} has no adapter_config.json; pass a directory written by save_adapter or PEFT")
    meta_path = d / "lowbit_adapter.json"
    if meta_path.is_file():
        return AdapterConfig(**json.loads(meta_path.read_text())["adapter"])
    peft = json.loads((d / "adapter_config.json").read_text())
    if peft.get("peft_type") != "LORA":
        raise ValueError(f"{d}: unsupported peft_type {peft.get('peft_type')!r}; lowbit loads LORA and "
                         f"{PEFT_DIABLO_TYPE}")
    targets = peft["target_modules"]
    return AdapterConfig(adapter="lora", rank=int(peft["r"]), alpha=float(peft["lora_alpha"]),
                         rslora=bool(peft.get("use_rslora", False)), dropout=float(peft.get("lora_dropout", 0.0)),
                         targets=list(targets) if not isinstance(targets, str) else [targets])


def load_adapter(model: nn.Module, adapter_dir: str | Path, trainable: bool = False) -> nn.Module:
    """Attach the adapter saved in ``adapter_dir`` to ``model`` (float or quantized base) and return ``model``.

    Raises ``ValueError`` before changing the model when the adapter's modules or shapes do not match it.
    """
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    config = read_adapter_config(d)
    state = load_file(str(d / "adapter_model.safetensors"))
    names = resolve_targets(model, config.targets)
    present = {k[len(PEFT_PREFIX):].rsplit(".", 2 if k.endswith(".weight") else 1)[0] for k in state}
    missing_in_model = sorted(present - set(names))
    if missing_in_model:
        raise ValueError(f"adapter {d} was saved for modules this model lacks, e.g. {missing_in_model[:3]} "
                         f"(model has {len(names)} target modules); it belongs to a different base model")
    missing_in_adapter = sorted(set(names) - present)
    if missing_in_adapter:
        raise ValueError(f"adapter {d} has no weights for {missing_in_adapter[:3]}...; it belongs to a different "
                         f"base model (fewer layers?)")
    _check_shapes(model, names, config)
    for name in names:
        m = model.get_submodule(name)
        if config.adapter == "lora":
            A = state[f"{PEFT_PREFIX}{name}.lora_A.weight"]
            B = state[f"{PEFT_PREFIX}{name}.lora_B.weight"]
            want = (config.rank, m.in_features), (m.out_features, config.rank)
            got = tuple(A.shape), tuple(B.shape)
        else:
            D = state[f"{PEFT_PREFIX}{name}.diablo_blocks"]
            want, got = (block_shape(m.in_features, m.out_features, config.num_blocks),), (tuple(D.shape),)
        if want != got:
            raise ValueError(f"adapter {d} does not match the model at {name}: stored shapes {got}, the model's "
                             f"{m.out_features}x{m.in_features} layer needs {want}; it belongs to a different base")
    for name in names:
        w = _make_wrapper(model.get_submodule(name), config)
        if config.adapter == "lora":
            w.set_factors(state[f"{PEFT_PREFIX}{name}.lora_A.weight"], state[f"{PEFT_PREFIX}{name}.lora_B.weight"])
        else:
            with torch.no_grad():
                w.blocks.copy_(state[f"{PEFT_PREFIX}{name}.diablo_blocks"])
        _set(model, name, w)
    for p in model.parameters():
        p.requires_grad_(False)
    if trainable:
        for m in adapter_modules(model).values():
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
    model.lowbit_adapter_config = config
    return model


def set_adapter_weights(model: nn.Module, adapter_dir: str | Path) -> None:
    """Copy the weights saved in ``adapter_dir`` into the adapters already attached to ``model`` (resuming a
    run). Raises ``ValueError`` when the stored and attached adapters differ in modules or shapes."""
    from safetensors.torch import load_file

    state = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    current = _adapter_state(model)
    if set(state) != set(current):
        extra, missing = sorted(set(state) - set(current)), sorted(set(current) - set(state))
        raise ValueError(f"checkpoint {adapter_dir} does not match the attached adapters: extra {extra[:3]}, "
                         f"missing {missing[:3]}")
    with torch.no_grad():
        for name, m in adapter_modules(model).items():
            if isinstance(m, LoRALinear):
                pairs = ((m.lora_A, f"{name}.lora_A.weight"), (m.lora_B, f"{name}.lora_B.weight"))
            else:
                pairs = ((m.blocks, f"{name}.diablo_blocks"),)
            for p, key in pairs:
                t = state[PEFT_PREFIX + key]
                if t.shape != p.shape:
                    raise ValueError(f"checkpoint {adapter_dir}: {key} has shape {tuple(t.shape)}, the model's "
                                     f"adapter {tuple(p.shape)}")
                p.copy_(t)


class without_adapters:
    """Context manager: the adapter wrappers are temporarily replaced by their bases (to save the quantized base
    alone with :func:`~lowbit.quant.serialization.save_quantized`), and put back on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.saved: dict[str, nn.Module] = {}

    def __enter__(self) -> nn.Module:
        self.saved = adapter_modules(self.model)
        for name, m in self.saved.items():
            _set(self.model, name, m.base)
        return self.model

    def __exit__(self, *exc) -> None:
        for name, m in self.saved.items():
            _set(self.model, name, m)
