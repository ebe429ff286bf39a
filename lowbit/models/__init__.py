"""Models lowbit can name without a path: the model-alias registry, the embedded tiny arithmetic LLaMA
(:mod:`lowbit.models.tiny`) and the ``smollm2-135m`` alias (:mod:`lowbit.models.smollm2`).

An alias maps a name to a function returning a local Hugging Face directory, so ``lowbit quantize --model tiny``, a
recipe's ``model.name: tiny`` and ``lowbit evaluate --model tiny`` all resolve the same way. Adding one is one file
with ``@register_model_alias("name")`` on ``fn() -> Path`` and its import at the end of this file. Importing this
package is cheap: the aliases' functions load nothing until they are called.
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


def alias_dir(name: str) -> Path | None:
    """The local directory of alias ``name`` (resolved: a first use may convert or unpack it), or ``None`` when
    ``name`` is not an alias."""
    fn = MODEL_ALIASES.get(name)
    return None if fn is None else fn().resolve()


@register_model_alias("tiny")
def tiny_dir() -> Path:
    """The embedded tiny arithmetic LLaMA (3.67M parameters)."""
    from .tiny import tiny_model_dir

    return tiny_model_dir()


# Built-in aliases defined in their own files (importing registers them).
from . import smollm2  # noqa: E402, F401
