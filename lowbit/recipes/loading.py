"""The one loader of the drivers: a model named by an alias (``tiny``), a Hugging Face directory or hub id, or a
lowbit quantized directory — optionally with an adapter on either.

Model aliases are a registry (:func:`register_model_alias`): an alias maps to a function returning a local Hugging
Face directory, so ``lowbit quantize --model tiny``, a recipe's ``model.name: tiny`` and ``lowbit evaluate --model
tiny`` all resolve the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

MODEL_ALIASES: dict[str, Callable[[], Path]] = {}


def register_model_alias(name: str):
    """Decorator: ``fn() -> Path`` of a local Hugging Face model directory, reachable as ``name``."""
    def deco(fn):
        if name in MODEL_ALIASES:
            raise ValueError(f"model alias {name!r} is already registered")
        MODEL_ALIASES[name] = fn
        return fn
    return deco


@register_model_alias("tiny")
def _tiny() -> Path:
    from ..tiny import tiny_model_dir

    return tiny_model_dir()


def resolve_model(model: str) -> tuple[str, bool]:
    """A model name -> (local path or hub id, whether it is a lowbit quantized directory). Raises ``ValueError``
    naming the value and what is accepted."""
    accepted = (f"a Hugging Face model directory or hub id, a lowbit quantized directory (from `lowbit quantize "
                f"--out`) or an alias ({', '.join(sorted(MODEL_ALIASES))})")
    p = Path(model).expanduser()
    if p.is_dir():
        if (p / "quant_config.json").is_file():
            return str(p.resolve()), True
        if not (p / "config.json").is_file():
            raise ValueError(f"model {model!r} is a directory without config.json; pass {accepted}")
        return str(p.resolve()), False
    if model in MODEL_ALIASES:
        return str(MODEL_ALIASES[model]().resolve()), False
    if p.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ValueError(f"model {model!r} is not a model directory; pass {accepted}")
    return model, False  # a hub id: from_pretrained reports whether it exists


def resolve_device_dtype(device: str | None, dtype: str) -> tuple[str, str]:
    """``device`` None -> cuda when available; ``dtype`` ``auto`` -> bfloat16 on cuda, float32 on cpu."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, dtype


def quantized_info(path: str) -> dict:
    """``{quantization, bits}`` of a lowbit quantized directory, read without loading it."""
    from ..quant import read_quant_meta

    q = read_quant_meta(path).get("quantization") or {}
    return {"quantization": q, "bits": q.get("bits")}


def load_tokenizer(path: str, quantized: bool = False):
    """The tokenizer of a model directory; for a quantized directory without one, its source model's."""
    from transformers import AutoTokenizer

    src = path
    if quantized and not (Path(path) / "tokenizer_config.json").is_file():
        from ..quant import read_quant_meta

        src = (read_quant_meta(path).get("source") or {}).get("model")
        if not src:
            raise ValueError(f"quantized model {path} holds no tokenizer and names no source model; re-run "
                             f"`lowbit quantize` (it saves the tokenizer)")
        src = resolve_model(src)[0]
    return AutoTokenizer.from_pretrained(src)


def load_base(model: str, device: str = "cpu", dtype: str = "float32"):
    """The model alone (float, or quantized as stored) -> ``(model, tokenizer, path, quantized)``."""
    import torch
    from transformers import AutoModelForCausalLM

    path, quantized = resolve_model(model)
    if quantized:
        from ..quant import load_quantized

        m = load_quantized(path, device=device)  # keeps the dtype it was quantized in
    else:
        try:
            m = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
        except OSError as e:
            raise ValueError(f"cannot load model {model!r}: {e}") from None
    return m, load_tokenizer(path, quantized), path, quantized


def load_model(model: str, adapter: str | None = None, device: str | None = None, dtype: str = "auto"):
    """Load ``model`` (see :func:`resolve_model`) and its tokenizer, attach ``adapter`` (a directory written by
    fine-tuning or PEFT) -> ``(model, tokenizer, info)`` with ``info = {quantized, quantization, bits, dtype,
    device}``, in eval mode. Raises ``ValueError`` with the fix."""
    device, dtype = resolve_device_dtype(device, dtype)
    m, tok, path, quantized = load_base(model, device, dtype)
    info = {"quantized": quantized, "quantization": None, "bits": 32 if dtype == "float32" else 16,
            "device": device, "dtype": str(next(m.parameters()).dtype).removeprefix("torch.")}
    if quantized:
        info.update(quantized_info(path))
    if adapter is not None:
        from ..adapters import load_adapter

        try:
            m = load_adapter(m, adapter)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"adapter {adapter!r} cannot be attached to model {model!r}: {e}. Pass as --model the "
                             f"base model (or quantized base) the adapter was trained on") from None
    m.eval()
    return m, tok, info


# Built-in aliases defined in their own files (importing registers them).
from . import smollm2  # noqa: E402, F401
