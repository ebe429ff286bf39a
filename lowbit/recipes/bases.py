"""Which quantized base a fine-tuning run trains on, and building that base once for every run that shares it.

:func:`shared_base` is the one answer to "which base does this recipe train on?", read from the recipe's ``quant`` and
``calibration`` sections and the init registry (never from recipe names): no ``quant`` section — the float model;
an init that quantizes the base itself (:attr:`AdapterInit.quantizes_base`: LoftQ, ApiQ-bw) — a base of its own,
made inside the run; otherwise the model quantized by ``quant`` on ``calibration``, which every recipe with the same
three settings shares (per-linear inits such as CLoQ read the float weights next to the cached packed layers).

:func:`build_base` quantizes it with ``lowbit quantize`` into a directory stamped with those settings and the
resulting weight hash, reused when the stamp matches and the files verify; :func:`base_perplexity` scores a base
on the embedded tiny model's held-out text.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..adapters import INITS
from ..io import DamagedFileError
from ..quant import QuantConfig
from ..rundir import DONE, RunDir
from .config import TINY, CalibrationConfig, RecipeConfig

log = logging.getLogger(__name__)

FLOAT, OWN = "float", "own"
STAMP = "base_stamp.json"  # beside quantize's own stamp: the settings and the weight hash of a shared base


@dataclass(frozen=True)
class BaseSpec:
    """A quantized base shared by runs: ``model`` (name or alias) quantized by ``quant`` on ``calibration``."""

    model: str
    quant: QuantConfig
    calibration: CalibrationConfig

    def settings(self) -> dict:
        """Every setting that determines the packed weights (each ``QuantConfig`` field included)."""
        return {"model": self.model, "quant": self.quant.to_dict(), "calibration": dict(vars(self.calibration))}

    @property
    def key(self) -> str:
        """``<method>-<bits>bit-<hash of the settings>``: a directory name, unique per distinct base."""
        digest = hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.quant.method}-{self.quant.bits}bit-{digest}"


def base_kind(cfg: RecipeConfig) -> str:
    """``float`` (no quant section), ``own`` (the init quantizes the base inside the run) or ``shared``."""
    if cfg.quant is None:
        return FLOAT
    return OWN if INITS[cfg.adapter.init].quantizes_base else "shared"


def shared_base(cfg: RecipeConfig) -> BaseSpec | None:
    """The cached base ``cfg`` trains on, or ``None`` when it trains on the float model or a base of its own."""
    if base_kind(cfg) != "shared":
        return None
    return BaseSpec(model=cfg.model.name, quant=cfg.quant, calibration=cfg.calibration)


def _same_base(old: dict, new: dict) -> bool:
    """Equal settings, the quantization compared as a ``QuantConfig`` (so a stamp of an older lowbit, lacking a
    setting added since, keeps matching where that setting has its default)."""
    try:
        return (QuantConfig.from_dict(old["quant"]) == QuantConfig.from_dict(new["quant"])
                and {k: v for k, v in old.items() if k != "quant"} == {k: v for k, v in new.items() if k != "quant"})
    except (KeyError, TypeError, ValueError):
        return False


def build_base(spec: BaseSpec, root: str | Path) -> tuple[Path, str]:
    """The base quantized into ``root/<spec.key>`` (reused when stamped with the same settings and its files verify);
    returns ``(directory, weights_sha256)``."""
    from ..quant import verify_quantized
    from .loading import model_dir_fingerprint
    from .quantize import QuantizeRun, run_quantize

    rd = RunDir(Path(root) / spec.key, "base", same=_same_base, stamp=STAMP)
    if rd.state(spec.settings()) == DONE:
        try:
            verify_quantized(rd.path)
            return rd.path, rd.found["weights_sha256"]  # the stamp state() has just read
        except (DamagedFileError, FileNotFoundError, KeyError) as e:
            log.warning("cached base %s is damaged (%s); rebuilding it", rd.path, getattr(e, "reason", e))
    rd.clear()
    rd.path.parent.mkdir(parents=True, exist_ok=True)
    log.info("base %s %d-bit -> %s", spec.quant.method, spec.quant.bits, rd.path)
    run_quantize(QuantizeRun(model=spec.model, out=str(rd.path), quant=spec.quant, calibration=spec.calibration,
                             ppl_windows=0, overwrite=True))
    weights = model_dir_fingerprint(str(rd.path))["weights_sha256"]
    rd.finish(spec.settings(), weights_sha256=weights)
    return rd.path, weights


def model_weights_sha256(model: str) -> str | None:
    """SHA-256 over the weight files of a model name, alias or directory (see ``model_dir_fingerprint``)."""
    from .loading import model_dir_fingerprint

    return model_dir_fingerprint(model)["weights_sha256"]


@functools.lru_cache(maxsize=2)
def _tiny_heldout(docs: int):
    """``(tokenizer, 1-D held-out ids)`` of the embedded tiny model: built once per process, shared by every base."""
    from transformers import AutoTokenizer

    from ..models.tiny import heldout_text_ids, tiny_model_dir

    tok = AutoTokenizer.from_pretrained(tiny_model_dir())
    return tok, heldout_text_ids(tok, n_docs=docs)


def base_perplexity(model: str, base: str | Path | None = None, docs: int = 400, seqlen: int = 256,
                    windows: int = 16) -> float:
    """Held-out perplexity of ``base`` (a quantized directory; ``None``: the float ``model``) on the embedded tiny
    model's held-out text. Other models ship no held-out text of their own: refused."""
    if model != TINY:
        raise ValueError(f"base perplexity is scored on the embedded tiny model's held-out text; model {model!r} has "
                         f"none (set base_perplexity: false in the spec)")
    import torch
    from transformers import AutoModelForCausalLM

    from ..eval.perplexity import perplexity
    from ..models.tiny import tiny_model_dir
    from ..quant import load_quantized

    held = _tiny_heldout(docs)[1]
    if base is None:
        m = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32).eval()
    else:
        m = load_quantized(base)
    return perplexity(m, held, seqlen, max_windows=windows)
