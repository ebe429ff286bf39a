"""Saving and loading adapters in PEFT's directory layout.

``adapter_config.json`` (the adapter class's :meth:`~lowbit.adapters.base.AdapterLayer.peft_config`) +
``adapter_model.safetensors`` with keys ``base_model.model.<module>.<suffix>`` — LoRA's ``lora_A.weight`` /
``lora_B.weight``, which ``peft.PeftModel.from_pretrained`` loads onto the dequantised base; DiaBlo's
``diablo_blocks`` under ``peft_type = "LOWBIT_DIABLO"`` — and ``lowbit_adapter.json`` with lowbit's full
:class:`AdapterConfig` and the fingerprint of the frozen base it was trained on
(:mod:`lowbit.adapters.fingerprint`) and the SHA-256 of the two other files (``files``); it is sealed
(:func:`lowbit.io.sealed`), so any changed byte of the directory is detected on load. Directories are written
atomically.

``load_adapter`` refuses a model whose base differs from that fingerprint unless ``force=True``; an adapter without
one (written by PEFT or by a lowbit older than the fingerprint) loads with a logged warning that its base cannot be
checked. Corrupt or truncated files raise :class:`~lowbit.io.DamagedFileError` (a ``ValueError``) naming the file
("checksum mismatch: FILE is corrupt" where only the checksum notices) and saying the files were changed after
saving; a missing one ``FileNotFoundError``; another base :class:`BaseMismatchError`. The two fixes differ (restore
or re-train the adapter; load it onto its own base), so callers tell them apart by type.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..io import (
    DamagedFileError,
    atomic_dir,
    atomic_write_json,
    check_finite,
    file_manifest,
    load_safetensors,
    read_json,
    recover_dir,
    verify_files,
)
from ..quant.arch import resolve_targets, set_submodule
from .base import base_shape
from .config import AdapterConfig
from .fingerprint import base_difference, base_fingerprint
from .model import adapter_modules, check_targets
from .registry import ADAPTERS, make_adapter

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
RERUN = "re-run the fine-tuning that wrote it"
#: The fix for an adapter whose files no longer match what save_adapter wrote (the seal or a recorded checksum).
CHANGED = ("the adapter's files were changed after it was saved (edited by hand, truncated or damaged on disk); "
           "restore them from a copy, or re-train the adapter (re-run the fine-tuning that wrote it)")


class BaseMismatchError(ValueError):
    """The model is not the base the adapter was trained on (other modules, shapes or base fingerprint): the fix is
    loading it onto that base, unlike for a damaged adapter file (:class:`~lowbit.io.DamagedFileError`)."""


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for name, m in adapter_modules(model).items():
        state.update(m.adapter_state(PEFT_PREFIX + name))
    return state


def save_adapter(model: nn.Module, out_dir: str | Path, config: AdapterConfig | None = None,
                 base_model_name_or_path: str | None = None, extra: dict | None = None,
                 fingerprint: dict | None = None) -> Path:
    """Write the adapter in PEFT layout to ``out_dir`` (atomically: a temp dir renamed into place).

    ``lowbit_adapter.json`` records ``fingerprint`` (default: :func:`base_fingerprint` of ``model``, computed from
    its frozen non-adapter tensors, i.e. the base the adapter must be loaded onto; an init that re-quantizes the
    base, such as LoftQ, has already done so). Pass a fingerprint computed once to save repeatedly without
    hashing the base each time (the base is frozen).
    """
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
            "base_fingerprint": fingerprint if fingerprint is not None else base_fingerprint(model), **(extra or {})}
    with atomic_dir(out_dir) as tmp:
        save_file(_adapter_state(model), str(Path(tmp) / WEIGHTS))
        atomic_write_json(Path(tmp) / "adapter_config.json", peft_cfg)
        meta["files"] = file_manifest(tmp, [WEIGHTS, "adapter_config.json"])
        atomic_write_json(Path(tmp) / "lowbit_adapter.json", meta, seal=True)
    return Path(out_dir)


def read_adapter_meta(adapter_dir: str | Path) -> dict | None:
    """The ``lowbit_adapter.json`` of an adapter directory, or ``None`` when it has none (a PEFT directory)."""
    recover_dir(adapter_dir)
    path = Path(adapter_dir) / "lowbit_adapter.json"
    if not path.is_file():
        return None
    meta = read_json(path, RERUN)
    if not isinstance(meta, dict) or not isinstance(meta.get("adapter"), dict):
        raise ValueError(f"{path} has no 'adapter' object; the file is corrupt, re-run the fine-tuning that wrote it")
    return meta


def read_adapter_config(adapter_dir: str | Path) -> AdapterConfig:
    """The :class:`AdapterConfig` stored in an adapter directory (PEFT LoRA directories from other tools too)."""
    d = Path(adapter_dir)
    recover_dir(d)
    if not (d / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{d} has no adapter_config.json; pass a directory written by save_adapter or PEFT")
    meta = read_adapter_meta(d)
    if meta is not None:
        return AdapterConfig.from_dict(meta["adapter"])  # also the flat format of older lowbit
    peft = read_json(d / "adapter_config.json", "re-save the adapter")
    by_type = {cls.peft_type: (name, cls) for name, cls in ADAPTERS.items() if cls.peft_type}
    if not isinstance(peft, dict) or peft.get("peft_type") not in by_type:
        got = peft.get("peft_type") if isinstance(peft, dict) else peft
        raise ValueError(f"{d}: unsupported peft_type {got!r}; lowbit loads {' and '.join(by_type)}")
    name, cls = by_type[peft["peft_type"]]
    return AdapterConfig(adapter=name, **cls.config_from_peft(peft))


def _read_weights(d: Path, meta: dict | None) -> dict[str, torch.Tensor]:
    state = load_safetensors(d / WEIGHTS, what=RERUN)
    if meta is not None:  # then the checksums (none in older directories): what the reader cannot notice
        verify_files(d, meta.get("files") or {}, RERUN)
    return state


def _check_weights_finite(d: Path, state: dict[str, torch.Tensor]) -> None:
    # after the checksums: NaN in files that still match them was saved so, by a run that diverged
    check_finite(state, d / WEIGHTS, f"{RERUN}, from a checkpoint before it diverged")


def _load_weights(d: Path) -> dict[str, torch.Tensor]:
    state = _read_weights(d, read_adapter_meta(d))
    _check_weights_finite(d, state)
    return state


def _check_base(model: nn.Module, d: Path, meta: dict | None, force: bool) -> None:
    """Compare ``model`` with the fingerprint of the base the adapter was trained on (see the module docstring)."""
    saved = (meta or {}).get("base_fingerprint")
    if saved is None:
        log.warning("adapter %s records no base fingerprint (written by PEFT or an older lowbit): lowbit cannot check "
                    "that this model is the base it was trained on", d)
        return
    diff = base_difference(saved, base_fingerprint(model))
    if diff is None:
        return
    where = f" (recorded: {meta['base']})" if meta.get("base") else ""
    msg = f"adapter {d} was trained on a different base: {diff}"
    if force:
        log.warning("%s; attaching it anyway (force=True)", msg)
        return
    raise BaseMismatchError(f"{msg}. Load it onto the base it was trained on{where}, or pass force=True to "
                            f"load_adapter (--force-adapter on the command line) to attach it anyway")


def _stored_modules(state: dict[str, torch.Tensor], suffixes: tuple[str, ...]) -> set[str]:
    """The module names of ``base_model.model.<module>.<suffix>`` keys (a key of another layout counts whole)."""
    names = set()
    for k in state:
        key = k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k
        names.add(next((key[: -len(s) - 1] for s in suffixes if key.endswith("." + s)), key))
    return names


def load_adapter(model: nn.Module, adapter_dir: str | Path, trainable: bool = False, force: bool = False
                 ) -> nn.Module:
    """Attach the adapter saved in ``adapter_dir`` to ``model`` (float or quantized base) and return ``model``.

    Raises, before changing the model, :class:`BaseMismatchError` when the adapter's modules or shapes do not match
    it or ``model`` is not the base the adapter was trained on (its recorded fingerprint,
    :mod:`lowbit.adapters.fingerprint`; ``force=True`` attaches it anyway, with a logged warning), and
    :class:`~lowbit.io.DamagedFileError` when its files are corrupt or were changed after saving.
    """
    d = Path(adapter_dir)
    try:
        config = read_adapter_config(d)
        meta = read_adapter_meta(d)
        state = _read_weights(d, meta)
    except DamagedFileError as e:  # the seal or a checksum: the files, not the base, are what changed
        raise DamagedFileError(e.path, e.reason, CHANGED) from None
    _check_weights_finite(d, state)
    cls = ADAPTERS[config.adapter]
    names = resolve_targets(model, config.targets)
    present = _stored_modules(state, cls.stored_keys())
    missing_in_model = sorted(present - set(names))
    if missing_in_model:
        raise BaseMismatchError(f"adapter {d} was saved for modules this model lacks, e.g. "
                                f"{missing_in_model[:3]} (model has {len(names)} target modules); it belongs to a "
                                f"different base model")
    missing_in_adapter = sorted(set(names) - present)
    if missing_in_adapter:
        raise BaseMismatchError(f"adapter {d} has no weights for {missing_in_adapter[:3]}...; it belongs to a "
                                f"different base model (fewer layers?)")
    check_targets(model, names, config)
    for name in names:
        inp, out = base_shape(model.get_submodule(name))
        want = tuple(cls.state_shapes(inp, out, config).values())
        keys = [f"{PEFT_PREFIX}{name}.{k}" for k in cls.stored_keys()]
        got = tuple(tuple(state[k].shape) if k in state else None for k in keys)
        if want != got:
            raise BaseMismatchError(f"adapter {d} does not match the model at {name}: stored shapes {got}, the "
                                    f"model's {out}x{inp} layer needs {want}; it belongs to a different base")
    _check_base(model, d, meta, force)
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
    state = _load_weights(recover_dir(adapter_dir))
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
