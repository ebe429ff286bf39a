"""Save and load a quantized model directory.

Layout: ``model.safetensors`` (every tensor of the model; each ``QuantLinear`` contributes its packed buffers
``qweight``/``scales``/``zeros`` or ``codebook``/``g_idx``/``bias``), ``quant_config.json`` (the
:class:`QuantConfig`, each quantized module's storage spec, tied tensors, the source model's name and
fingerprint), the Hugging Face ``config.json`` (+ ``generation_config.json``) and the tokenizer. Loading builds
the architecture with empty weights, swaps in empty ``QuantLinear``s and assigns the stored tensors, so it needs no
calibration, never materialises full-precision weights, and reproduces logits bit-exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..io import atomic_dir, atomic_write_json
from .arch import set_submodule
from .config import QuantConfig
from .model import quantized_modules
from .qlinear import QuantLinear

log = logging.getLogger(__name__)

QUANT_CONFIG = "quant_config.json"
WEIGHTS = "model.safetensors"
FORMAT = "lowbit-quant"
FORMAT_VERSION = 1


def config_fingerprint(hf_config) -> str:
    """A short hash of a Hugging Face config (architecture identity, not weights)."""
    d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "quantization_config",
              "use_cache", "architectures"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _dedup_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    sd = model.state_dict()
    seen: dict[tuple, str] = {}
    out, tied = {}, {}
    for k, v in sd.items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape), v.device)
        if v.numel() and key in seen:
            tied[k] = seen[key]
            continue
        seen[key] = k
        out[k] = v.detach().contiguous().cpu()
    return out, tied


def save_quantized(model: nn.Module, out_dir: str | Path, config: QuantConfig, tokenizer=None,
                   source: str | None = None, extra: dict | None = None) -> Path:
    """Write ``model`` (with ``QuantLinear`` modules) to ``out_dir`` atomically; returns the path."""
    from safetensors.torch import save_file

    qmods = quantized_modules(model)
    if not qmods:
        raise ValueError("model holds no QuantLinear modules: quantize it first (lowbit.quant.quantize_model)")
    tensors, tied = _dedup_state_dict(model)
    modules = {
        name: {"in_features": m.in_features, "out_features": m.out_features, "bits": m.bits,
               "group_size": m.group_size, "codebook": m.codebook is not None, "act_order": m.g_idx is not None,
               "bias": m.bias is not None, "bias_dtype": str(m.bias.dtype).removeprefix("torch.") if m.bias is not None
               else None}
        for name, m in qmods.items()
    }
    hf_config = getattr(model, "config", None)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "quantization": config.to_dict(),
        "source": {"model": source, "fingerprint": config_fingerprint(hf_config) if hf_config is not None else None},
        "modules": modules, "tied": tied, **(extra or {}),
    }
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if hf_config is not None:
            hf_config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(tmp)
            except Exception as e:  # an invalid generation config must not lose the quantized model
                log.warning("generation config not saved: %s", e)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / QUANT_CONFIG, meta)
    log.info("saved quantized model to %s (%d quantized modules)", out_dir, len(modules))
    return out_dir


def read_quant_meta(path: str | Path) -> dict:
    p = Path(path) / QUANT_CONFIG
    if not p.is_file():
        raise FileNotFoundError(f"{path} is not a lowbit quantized model directory (no {QUANT_CONFIG}); "
                                f"create one with `lowbit quantize --out {path}`")
    meta = json.loads(p.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{p} has format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{p} was written by a newer lowbit (format_version {meta['format_version']}); upgrade")
    return meta


def load_quantized(path: str | Path, device: str | torch.device = "cpu",
                   compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Load a directory written by :func:`save_quantized` -> the model in eval mode, on ``device``."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    meta = read_quant_meta(path)
    hf_config = AutoConfig.from_pretrained(path)
    # Parameters on the meta device (no allocation); buffers such as rotary inv_freq are computed for real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config)
    for name, spec in meta["modules"].items():
        bias_dtype = getattr(torch, spec["bias_dtype"]) if spec.get("bias_dtype") else torch.float32
        q = QuantLinear(spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"],
                        bias=spec["bias"], codebook=spec["codebook"], act_order=spec["act_order"],
                        compute_dtype=compute_dtype, bias_dtype=bias_dtype)
        set_submodule(model, name, q)
    sd = load_file(str(path / WEIGHTS), device=str(device))
    for dup, orig in meta.get("tied", {}).items():
        sd[dup] = sd[orig]
    model.load_state_dict(sd, strict=True, assign=True)
    if meta.get("tied"):
        # Re-tie (assign=True created separate Parameter objects over the same storage).
        for dup, orig in meta["tied"].items():
            dmod, _, dname = dup.rpartition(".")
            omod, _, oname = orig.rpartition(".")
            src = getattr(model.get_submodule(omod), oname)
            if isinstance(src, nn.Parameter):
                setattr(model.get_submodule(dmod), dname, src)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise ValueError(f"{path / WEIGHTS} lacks tensors for {leftover[:5]}; the directory is incomplete")
    model.to(device)
    model.eval()
    return model
