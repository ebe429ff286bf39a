"""The adapter as initialised, before any training step.

An initialised method (CLoQ's closed form, calibrated DiaBlo, LoftQ, ApiQ-bw) changes the model before training, so
its true starting point is the base *with* the initialised adapter, not the bare base. :func:`initialise` builds the
recipe's model exactly as ``lowbit finetune`` does (base quantized or loaded as configured, adapters initialised,
``train.seed`` set first) and saves base and adapter, so that ``lowbit evaluate`` can score it like a trained run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .config import RecipeConfig
from .finetune import build_model, pick_device, recipe_tokenizer, save_model

log = logging.getLogger(__name__)


def initialise(cfg: RecipeConfig, out: str | Path) -> str:
    """Build ``cfg``'s model with its adapters initialised (no training) and save the adapter to ``out/adapter``
    (and a re-quantized base to ``out/base`` where the init changes it); -> the base's path, as a trained run's."""
    import torch

    out = Path(out)
    tokenizer = recipe_tokenizer(cfg)
    torch.manual_seed(cfg.train.seed)  # the data-free part of an init (LoRA's A) draws from it, as in training
    model, report = build_model(cfg, tokenizer, pick_device(cfg))
    log.info("initialised %s/%s: %s trainable parameters -> %s", cfg.adapter.adapter, cfg.adapter.init,
             f"{report['trainable']:,}", out)
    return save_model(cfg, model, tokenizer, out)
