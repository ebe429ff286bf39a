"""The embedded tiny arithmetic LLaMA: its checkpoint (``tiny_arith/``), its pre-training corpus (``corpus``),
tokenizer (``tokenizer``) and outlier-channel step (``outliers``), and held-out / calibration text in its style.

``lowbit pretrain-tiny`` (:mod:`lowbit.recipes.pretrain_tiny`) rebuilds the checkpoint from nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch

# The embedded pre-trained tiny arithmetic LLaMA (built by `lowbit pretrain-tiny`; see its pretrain.json).
TINY_MODEL_DIR = Path(__file__).parent / "tiny_arith"


def tiny_model_dir() -> Path:
    """Path of the embedded tiny model; raises with the regeneration command if it is missing."""
    if not (TINY_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(f"the embedded tiny model is missing at {TINY_MODEL_DIR}; rebuild it with "
                                f"`lowbit pretrain-tiny --out {TINY_MODEL_DIR} --steps 1500 --seed 0`")
    return TINY_MODEL_DIR


def heldout_text_ids(tokenizer, n_docs: int = 1500, seed: int = 12345) -> torch.Tensor:
    """1-D token ids of held-out pre-training-style text (a seed the pre-training corpus never uses)."""
    from .corpus import pretrain_corpus
    from .tokenizer import concat_with_eos

    return torch.tensor(concat_with_eos(tokenizer, pretrain_corpus(n_docs, seed=seed)))


def calibration_ids(tokenizer, nsamples: int = 64, seqlen: int = 256, seed: int = 777) -> torch.Tensor:
    """``(nsamples, seqlen)`` calibration windows of pre-training-style text (disjoint seed)."""
    ids = heldout_text_ids(tokenizer, n_docs=max(200, nsamples * seqlen // 20), seed=seed)
    if len(ids) < nsamples * seqlen:
        raise ValueError(f"calibration text too short: {len(ids)} < {nsamples * seqlen} tokens")
    return ids[: nsamples * seqlen].view(nsamples, seqlen)
