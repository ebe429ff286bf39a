"""Save and load a quantized model directory.

Layout: ``model.safetensors`` (every tensor of the model; each ``QuantLinear`` contributes its packed buffers
``qweight``/``scales``/``zeros`` or ``codebook``/``g_idx``/``bias``), ``quant_config.json`` (the
:class:`QuantConfig`, each quantized module's storage spec, tied tensors, the source model's name and fingerprint,
and ``files``: the SHA-256 of every file loading reads), the Hugging Face ``config.json`` (+
``generation_config.json``) and the tokenizer; ``quant_config.json`` is sealed (:func:`lowbit.io.sealed`). Loading
builds the architecture with empty weights, swaps in empty ``QuantLinear``s and assigns the stored tensors, so it
needs no calibration, never materialises full-precision weights, and reproduces logits bit-exactly. A truncated or
corrupt file (any changed byte: the checksums), stored tensors that do not match ``quant_config.json``, and
non-finite stored values (scales, zeros, any float tensor) raise ``ValueError`` naming the file (and the tensor), a
missing one ``FileNotFoundError``, before the model is returned. Checking the checksums reads every file once more
(SHA-256 at about 1 GB/s: 40 ms for a 2-bit SmolLM2-135M, about 2 s for a 2-bit 7B model).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from ..io import (
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    check_finite,
    file_manifest,
    load_safetensors,
    read_json,
    recover_dir,
    verify_files,
)
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
                   source: str | None = None, extra: dict | None = None, files: dict[str, str] | None = None,
                   progress: bool = False) -> Path:
    """Write ``model`` (with ``QuantLinear`` modules) to ``out_dir`` atomically; returns the path. ``files``: more
    text files (name -> content, e.g. a report) written into the same directory, in the same atomic step.
    ``progress``: a bar over the weight bytes (each step of the save is logged either way)."""
    from ..safetensors_io import human_bytes, save_file_streamed, write_progress

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
    t0 = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        with write_progress(tensors, f"saving {WEIGHTS}", progress) as bar:
            save_file_streamed(tensors, tmp / WEIGHTS, metadata={"format": "pt"}, progress=bar)
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
        for name, text in (files or {}).items():
            atomic_write_text(tmp / name, text)
        # The checksums cover what loading reads (not the reports in ``files``, which lowbit never reads back).
        names = [p.name for p in tmp.iterdir() if p.is_file() and p.name not in {QUANT_CONFIG, *(files or {})}]
        log.info("checksums of %d files (SHA-256 of %s)", len(names),
                 human_bytes(sum((tmp / n).stat().st_size for n in names)))
        atomic_write_json(tmp / QUANT_CONFIG, {**meta, "files": file_manifest(tmp, names)}, seal=True)
        log.info("flushing %s to disk", out_dir)  # the fsync of every file, then the swap (atomic_dir)
    log.info("saved quantized model to %s (%d quantized modules) in %.1fs", out_dir, len(modules),
             time.perf_counter() - t0)
    return out_dir


def read_quant_meta(path: str | Path) -> dict:
    """The ``quant_config.json`` of a quantized model directory (``ValueError`` when it is corrupt or of another
    format, ``FileNotFoundError`` when the directory is not one)."""
    recover_dir(path)
    p = Path(path) / QUANT_CONFIG
    if not p.is_file():
        raise FileNotFoundError(f"{path} is not a lowbit quantized model directory (no {QUANT_CONFIG}); "
                                f"create one with `lowbit quantize --out {path}`")
    meta = read_json(p, f"`lowbit quantize --out {path}`")
    if not isinstance(meta, dict):
        raise ValueError(f"{p} holds a JSON {type(meta).__name__}, not an object; the file is corrupt, re-create "
                         f"it (`lowbit quantize --out {path}`)")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{p} has format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{p} was written by a newer lowbit (format_version {meta['format_version']}); upgrade")
    return meta


def verify_quantized(path: str | Path, weights: bool = True) -> dict:
    """:func:`read_quant_meta`, then every file of the directory against the size and SHA-256 recorded there
    (``weights=False``: all but the weights file, a cheap check before the expensive work); returns the metadata.
    ``ValueError`` ("truncated or corrupt", "checksum mismatch: FILE is corrupt") or ``FileNotFoundError`` naming
    the file. A directory written before lowbit recorded checksums has none to check."""
    meta = read_quant_meta(path)
    files = meta.get("files") or {}
    if not weights and isinstance(files, dict):
        files = {k: v for k, v in files.items() if k != WEIGHTS}
    verify_files(path, files, f"`lowbit quantize --out {path}`")
    return meta


def holds_packed_weights(path: str | Path) -> bool:
    """Whether ``path/model.safetensors`` holds lowbit's packed layers (read from its header alone): a directory
    with them but without ``quant_config.json`` is a damaged quantized model, not a float one."""
    from safetensors import safe_open

    f = Path(path) / WEIGHTS
    if not f.is_file():
        return False
    try:
        with safe_open(str(f), framework="pt") as h:
            return any(k.endswith((".qweight", ".codebook")) for k in h.keys())
    except Exception:  # an unreadable file: its loader reports it, naming it
        return False


def load_quantized(path: str | Path, device: str | torch.device = "cpu",
                   compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Load a directory written by :func:`save_quantized` -> the model in eval mode, on ``device``."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    meta = verify_quantized(path, weights=False)  # the weights' checksum last: the checks below name more
    fix = f"`lowbit quantize --out {path}`"
    read_json(path / "config.json", fix)  # a corrupt config surfaces here, named, not as a transformers error
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)  # a directory: no hub
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path / 'config.json'} cannot be read as a model config ({e}); re-create it ({fix})") \
            from None
    # Parameters on the meta device (no allocation); buffers such as rotary inv_freq are computed for real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config)
    try:
        for name, spec in meta["modules"].items():
            bias_dtype = getattr(torch, spec["bias_dtype"]) if spec.get("bias_dtype") else torch.float32
            q = QuantLinear(spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"],
                            bias=spec["bias"], codebook=spec["codebook"], act_order=spec["act_order"],
                            compute_dtype=compute_dtype, bias_dtype=bias_dtype)
            set_submodule(model, name, q)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"{path / QUANT_CONFIG} has a damaged module entry ({type(e).__name__}: {e}); re-create it "
                         f"({fix})") from None
    sd = load_safetensors(path / WEIGHTS, device=device, what=fix)
    # NaN/Inf scales or zeros would dequantise to NaN weights; no quantizer writes them, so the file is corrupt.
    check_finite(sd, path / WEIGHTS, fix)
    for dup, orig in meta.get("tied", {}).items():
        if orig not in sd:
            raise ValueError(f"{path / WEIGHTS} lacks {orig} (tied to {dup}); the file is incomplete, re-create it "
                             f"({fix})")
        sd[dup] = sd[orig]
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{path / WEIGHTS} does not match {path / QUANT_CONFIG} (missing, extra or mis-shaped "
                         f"tensors): {str(e)[:500]}; the directory is corrupt or mixed, re-create it ({fix})") \
            from None
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
    verify_files(path, {k: v for k, v in (meta.get("files") or {}).items() if k == WEIGHTS}, fix)  # flipped data
    model.to(device)
    model.eval()
    try:  # how it was quantized, for messages (a quantizer registered by a plugin may not be imported here)
        model.lowbit_quant_config = QuantConfig.from_dict(meta["quantization"])
    except (ValueError, TypeError):
        model.lowbit_quant_config = None
    return model
