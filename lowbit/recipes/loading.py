"""The one loader of the drivers: a model named by an alias (``tiny``, ``smollm2-135m``: :mod:`lowbit.models`), a
Hugging Face directory or hub id, or a lowbit quantized directory — optionally with an adapter on either.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from ..models import MODEL_ALIASES, alias_dir


def resolve_model(model: str) -> tuple[str, bool]:
    """A model name -> (local path or hub id, whether it is a lowbit quantized directory). Raises
    ``FileNotFoundError`` for a path that does not exist (:func:`is_path_like`: never sent to the hub) and
    ``ValueError`` naming the value and what is accepted."""
    from ..io import recover_dir

    accepted = (f"a Hugging Face model directory or hub id, a lowbit quantized directory (from `lowbit quantize "
                f"--out`) or an alias ({', '.join(sorted(MODEL_ALIASES))})")
    p = recover_dir(Path(model).expanduser())  # a directory swap cut short by a crash is finished first
    if p.is_dir():
        if (p / "quant_config.json").is_file():
            return str(p.resolve()), True
        if not (p / "config.json").is_file():
            raise ValueError(f"model {model!r} is a directory without config.json; pass {accepted}")
        from ..quant import holds_packed_weights

        if not (p / "quantize_config.json").is_file() and holds_packed_weights(p):
            # Loaded as a float model, its packed layers would be ignored and the linears left random.
            raise FileNotFoundError(f"{p / 'quant_config.json'} does not exist, but {p / 'model.safetensors'} holds "
                                    f"lowbit's packed layers: the quantized model directory is damaged; re-create "
                                    f"it (`lowbit quantize --out {p}`)")
        return str(p.resolve()), False
    if model in MODEL_ALIASES:
        return str(alias_dir(model)), False
    if not p.exists() and is_path_like(model):
        raise FileNotFoundError(f"no such model directory: {model} ({_nearest_entries(p)}); pass an existing model "
                                f"directory, an alias ({', '.join(sorted(MODEL_ALIASES))}) or a hub id org/name"
                                f"{_not_a_hub_id(model)}")
    if p.exists() or model.count("/") != 1:
        close = difflib.get_close_matches(model, list(MODEL_ALIASES), n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ValueError(f"model {model!r} is not a model directory{hint}; pass {accepted}")
    return model, False  # a hub id: from_pretrained reports whether it exists


def is_path_like(model: str) -> bool:
    """Whether a model name can only mean a local path, so that a missing one is reported at once instead of being
    looked up on the hub (minutes of retries, then "check your internet connection"): it starts with ``/``, ``.``
    or ``~``, ends with ``/``, holds more than one ``/``, or its first component is a local directory (``runs/x``
    beside ``runs/``). A hub id is ``org/name``."""
    if model.startswith(("/", ".", "~")) or model.endswith("/") or model.count("/") > 1:
        return True
    if os.sep != "/" and os.sep in model:
        return True
    return "/" in model and Path(model.split("/")[0]).is_dir()


def _not_a_hub_id(model: str) -> str:
    first = model.split("/")[0]
    if model.count("/") == 1 and not model.endswith("/") and Path(first).is_dir():
        return f" (it is not looked up on the hub: {first}/ is a local directory)"
    return ""


def _nearest_entries(p: Path) -> str:
    """Where a missing path stops existing, and the entries there closest to the missing name."""
    parent = p.parent
    while parent != parent.parent and not parent.is_dir():
        p, parent = parent, parent.parent
    where = "the current directory" if str(parent) == "." else f"{parent}{'' if str(parent).endswith('/') else '/'}"
    try:
        names = sorted(x.name for x in parent.iterdir() if not x.name.startswith("."))
    except OSError:
        return f"{where} has no {p.name!r}"
    close = difflib.get_close_matches(p.name, names, n=3, cutoff=0.5)
    if close:
        shown = [str(parent / n) if str(parent) != "." else n for n in close]
        return f"{where} has no {p.name!r}; closest: {', '.join(shown)}"
    if not names:
        return f"{where} has no {p.name!r}; it is empty"
    listed = ", ".join(names[:6]) + (f", ... ({len(names)} entries)" if len(names) > 6 else "")
    return f"{where} has no {p.name!r}; it holds {listed}"


def local_only(path: str) -> dict:
    """``from_pretrained`` keyword arguments for ``path``: a local directory is read without asking the hub
    (``local_files_only``), so no network timeout can follow a local model; a hub id gets none."""
    return {"local_files_only": True} if Path(path).is_dir() else {}


def load_float_model(path: str, dtype: str, device, stream: bool = True):
    """The float causal LM at ``path`` (from :func:`resolve_model`) in eval mode. ``stream``: when ``path`` is a
    directory of safetensors files, only embeddings, norm and head are read now and each decoder layer is read when
    quantization reaches it (:mod:`lowbit.quant.streaming`); otherwise the whole model is loaded."""
    import logging

    import torch

    from ..quant.streaming import INDEX, SINGLE, load_streaming

    if stream and any((Path(path) / f).is_file() for f in (INDEX, SINGLE)):
        return load_streaming(path, getattr(torch, dtype), device)
    if stream:
        logging.getLogger(__name__).info("%s holds no safetensors files: loading the whole model", path)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **local_only(path)).to(
        device).eval()


def read_model_config(model: str):
    """The Hugging Face config of a model name (:func:`resolve_model`), from ``config.json`` alone: no weights are
    read. Raises ``ValueError`` naming the model."""
    from transformers import AutoConfig

    path = resolve_model(model)[0]
    try:
        return AutoConfig.from_pretrained(path, **local_only(path))
    except (OSError, ValueError) as e:
        one_line = str(e).replace("\n", " ")  # transformers' hub messages span lines; the CLI prints one
        raise ValueError(f"cannot read a model config from {model!r}: {one_line}{_hub_hint(model, path)}") from None


def _hub_hint(model: str, path: str) -> str:
    """For a name that was looked up on the hub: say so, and name a local directory it may have meant."""
    if Path(path).is_dir():
        return ""
    first = model.split("/")[0]
    try:
        dirs = [x.name for x in Path().iterdir() if x.is_dir() and not x.name.startswith(".")]
    except OSError:
        dirs = []
    close = difflib.get_close_matches(first, dirs, n=1, cutoff=0.75)
    local = f"; did you mean the local directory {close[0]}/{model[len(first) + 1:]}?" if close else ""
    return f" ({model} is no local directory, so it was looked up on the hub as a model id{local})"


def check_architecture(hf_config, model: str) -> None:
    """Raise ``ValueError`` unless lowbit's architecture table (:mod:`lowbit.quant.arch`) knows the config's
    ``model_type``: quantization and adapters both need it, so this runs before any weights are loaded."""
    from ..quant.arch import ARCHITECTURES

    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        archs = ", ".join(getattr(hf_config, "architectures", None) or []) or "no architectures listed"
        raise ValueError(f"model {model!r} has architecture {model_type!r} ({archs}), which lowbit cannot quantize "
                         f"or fit adapters to; supported model types: {sorted(ARCHITECTURES)} (a LLaMA-like model "
                         f"needs an ArchSpec in lowbit.quant.arch.ARCHITECTURES)")


# Weight files are hashed once per process while their size and mtime are unchanged: a 7B base is ~13 GB.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_HASHES: dict[tuple[str, int, int], str] = {}


def _weight_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        from ..io import sha256_file

        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def _local_dir(path: str) -> Path | None:
    """A local directory, or the cached snapshot of a hub id (``None`` if it was never downloaded)."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, "config.json")
    return Path(cached).parent if isinstance(cached, str) else None


def model_dir_fingerprint(model: str) -> dict:
    """The identity of a base model, without loading it: ``{model, path, quantized, model_type, weights,
    weights_sha256, quantization}``.

    The identity is the SHA-256 of every weight file in the model's directory (``weights``: file name ->
    hex digest, files ending in :data:`WEIGHT_SUFFIXES`) -- sound, as any changed weight changes it, and
    independent of where the directory lives; ``weights_sha256`` hashes the sorted ``name:digest`` lines into one
    value. Aliases are fingerprinted through their resolved directory. ``quantization``: the stored
    ``QuantConfig`` dict of a lowbit quantized directory (``source``: its source model), else ``None``. A hub id
    that is not in the local cache has no weights to hash: ``weights_sha256`` is ``None``.
    """
    import hashlib

    from ..io import read_json

    path, quantized = resolve_model(model)
    d = _local_dir(path)
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES) if d else []
    weights = {p.name: _weight_sha256(p) for p in files}
    joined = "".join(f"{n}:{h}\n" for n, h in weights.items())
    config = d / "config.json" if d else None
    out = {"model": model, "path": path, "quantized": quantized,
           "model_type": read_json(config).get("model_type") if config and config.is_file() else None,
           "weights": weights, "weights_sha256": hashlib.sha256(joined.encode()).hexdigest() if weights else None,
           "quantization": None}
    if quantized:
        from ..quant import read_quant_meta

        meta = read_quant_meta(path)
        out.update(quantization=meta.get("quantization"), source=meta.get("source"))
    return out


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
    try:
        return AutoTokenizer.from_pretrained(src, **local_only(src))
    except Exception as e:  # tokenizers raises its own types on a damaged file
        raise ValueError(f"cannot load the tokenizer of {src} ({type(e).__name__}: {str(e)[:300]}); its tokenizer "
                         f"files are missing or damaged") from None


def load_base(model: str, device: str = "cpu", dtype: str = "float32"):
    """The model alone (float, or quantized as stored) -> ``(model, tokenizer, path, quantized)``."""
    import torch
    from transformers import AutoModelForCausalLM

    path, quantized = resolve_model(model)
    from ..quant.gptq_import import gptq_settings

    if quantized:
        from ..quant import load_quantized

        m = load_quantized(path, device=device)  # keeps the dtype it was quantized in
    elif Path(path).is_dir() and gptq_settings(path) is not None:
        from ..quant.gptq_import import load_gptq_checkpoint

        m = load_gptq_checkpoint(path, device=device, dtype=getattr(torch, dtype))
    else:
        from safetensors import SafetensorError

        try:
            m = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **local_only(path))
        except (OSError, SafetensorError) as e:
            raise ValueError(f"cannot load model {model!r}: {e}") from None
        m = m.to(device)
    return m, load_tokenizer(path, quantized), path, quantized


def load_model(model: str, adapter: str | None = None, device: str | None = None, dtype: str = "auto",
               force_adapter: bool = False):
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
        m = _attach_adapter(m, model, adapter, force_adapter)
    m.eval()
    return m, tok, info


def _attach_adapter(m, model: str, adapter: str, force: bool):
    """``load_adapter`` with advice that fits the failure: another base is fixed by ``--model``; damaged or edited
    adapter files (their own message says how) and anything else are not."""
    from ..adapters import BaseMismatchError, load_adapter
    from ..io import DamagedFileError

    try:
        return load_adapter(m, adapter, force=force)
    except DamagedFileError as e:
        raise ValueError(f"adapter {adapter!r} cannot be loaded: {e}") from None
    except BaseMismatchError as e:
        raise ValueError(f"adapter {adapter!r} cannot be attached to model {model!r}: {e}. Pass as --model the "
                         f"base model (or quantized base) the adapter was trained on") from None
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"adapter {adapter!r} cannot be attached to model {model!r}: {e}") from None


def base_fingerprint(cfg) -> dict:
    """The base the adapter was trained on: the loaded model's identity (:func:`model_dir_fingerprint`) and the
    quantization applied to it (a quantized directory's own, the recipe's ``quant``, or ``None``)."""
    fp = model_dir_fingerprint(cfg.model.quantized or cfg.model.name)
    if not cfg.model.quantized:
        fp["quantization"] = cfg.quant.to_dict() if cfg.quant is not None else None
    return fp


def bits_and_method(cfg) -> dict:
    """``{bits, quant_method}`` of a recipe's base (16 and ``None`` for a float base)."""
    if cfg.model.quantized:
        from ..quant import read_quant_meta

        q = read_quant_meta(cfg.model.quantized)["quantization"]
        return {"bits": q["bits"], "quant_method": q["method"]}
    if cfg.quant is not None:
        return {"bits": cfg.quant.bits, "quant_method": cfg.quant.method}
    return {"bits": 16, "quant_method": None}
