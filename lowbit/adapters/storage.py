"""Saving and loading adapters in PEFT's directory layout.

``adapter_config.json`` (the adapter class's :meth:`~lowbit.adapters.base.AdapterLayer.peft_config`) +
``adapter_model.safetensors`` with keys ``base_model.model.<module>.<suffix>`` — LoRA's ``lora_A.weight`` /
``lora_B.weight``, which ``peft.PeftModel.from_pretrained`` loads onto the dequantised base; DiaBlo's
``diablo_blocks`` under ``peft_type = "LOWBIT_DIABLO"`` — and ``lowbit_adapter.json`` with lowbit's full
:class:`AdapterConfig`. Directories are written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..io import atomic_dir, atomic_write_json
from ..quant.arch import resolve_targets, set_submodule
from .base import base_shape
from .config import AdapterConfig
from .model import adapter_modules, check_targets
from .registry import ADAPTERS, make_adapter

PEFT_PREFIX = "base_model.model."


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for name, m in adapter_modules(model).items():
        state.update(m.adapter_state(PEFT_PREFIX + name))
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
    if any(m.merged for m in mods.values()):
        raise ValueError("some adapters are merged into their base; unmerge() them before saving")
    base = base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None)
    shapes = {n: [m.out_features, m.in_features] for n, m in mods.items()}
    peft_cfg = ADAPTERS[config.adapter].peft_config(config, base)
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
    by_type = {cls.peft_type: (name, cls) for name, cls in ADAPTERS.items() if cls.peft_type}
    if peft.get("peft_type") not in by_type:
        raise ValueError(f"{d}: unsupported peft_type {peft.get('peft_type')!r}; lowbit loads "
                         f"{' and '.join(by_type)}")
    name, cls = by_type[peft["peft_type"]]
    return AdapterConfig(adapter=name, **cls.config_from_peft(peft))


def _stored_modules(state: dict[str, torch.Tensor], suffixes: tuple[str, ...]) -> set[str]:
    """The module names of ``base_model.model.<module>.<suffix>`` keys (a key of another layout counts whole)."""
    names = set()
    for k in state:
        key = k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k
        names.add(next((key[: -len(s) - 1] for s in suffixes if key.endswith("." + s)), key))
    return names


def load_adapter(model: nn.Module, adapter_dir: str | Path, trainable: bool = False) -> nn.Module:
    """Attach the adapter saved in ``adapter_dir`` to ``model`` (float or quantized base) and return ``model``.

    Raises ``ValueError`` before changing the model when the adapter's modules or shapes do not match it.
    """
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    config = read_adapter_config(d)
    cls = ADAPTERS[config.adapter]
    state = load_file(str(d / "adapter_model.safetensors"))
    names = resolve_targets(model, config.targets)
    present = _stored_modules(state, tuple(cls.stored_params))
    missing_in_model = sorted(present - set(names))
    if missing_in_model:
        raise ValueError(f"adapter {d} was saved for modules this model lacks, e.g. {missing_in_model[:3]} "
                         f"(model has {len(names)} target modules); it belongs to a different base model")
    missing_in_adapter = sorted(set(names) - present)
    if missing_in_adapter:
        raise ValueError(f"adapter {d} has no weights for {missing_in_adapter[:3]}...; it belongs to a different "
                         f"base model (fewer layers?)")
    check_targets(model, names, config)
    for name in names:
        inp, out = base_shape(model.get_submodule(name))
        want = tuple(cls.state_shapes(inp, out, config).values())
        keys = [f"{PEFT_PREFIX}{name}.{k}" for k in cls.stored_params]
        got = tuple(tuple(state[k].shape) if k in state else None for k in keys)
        if want != got:
            raise ValueError(f"adapter {d} does not match the model at {name}: stored shapes {got}, the model's "
                             f"{out}x{inp} layer needs {want}; it belongs to a different base")
    for name in names:
        w = make_adapter(model.get_submodule(name), config)
        w.load_adapter_state(state, PEFT_PREFIX + name)
        set_submodule(model, name, w)
    for p in model.parameters():
        p.requires_grad_(False)
    if trainable:
        for m in adapter_modules(model).values():
            for p in m.trainable_parameters():
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
    bad = [k for k in state if state[k].shape != current[k].shape]
    if bad:
        raise ValueError(f"checkpoint {adapter_dir}: {bad[0]} has shape {tuple(state[bad[0]].shape)}, the model's "
                         f"adapter {tuple(current[bad[0]].shape)}")
    for name, m in adapter_modules(model).items():
        m.load_adapter_state(state, PEFT_PREFIX + name)
