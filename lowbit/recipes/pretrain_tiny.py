"""``lowbit pretrain-tiny``: build lowbit's embedded tiny arithmetic LLaMA from nothing, reproducibly.

The base model is pre-trained (next-token prediction) on a synthetic corpus: general text — arithmetic facts,
equations, chained computations and numbers in short narrative text (:func:`lowbit.models.tiny.corpus.pretrain_corpus`)
— and, for ``worked_fraction`` of the documents, worked problems in plain prose
(:func:`lowbit.models.tiny.corpus.worked_corpus`, test problems excluded). It never sees the instruction/response format
nor "The answer is", so that fine-tuning on the Math10K-style split has real work to do, as with LLaMA-2 on
Math10K. Last, a few LLaMA-like outlier input channels are added to every decoder linear without changing the
function (:mod:`lowbit.models.tiny.outliers`), so that 2-bit round-to-nearest damages the model as it does LLaMA. The
tokenizer is a byte-level BPE with single-digit tokens trained on that corpus
plus the training split's text (so the prompt words exist as tokens); the embedding matrix is padded to a multiple
of 64 rows so that every linear dimension is divisible by 64.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..data.prompts import APIQ
from ..io import atomic_dir, atomic_write_json, read_json
from ..models.tiny.tokenizer import build_tokenizer, concat_with_eos
from ..rundir import RunDir

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 768
    vocab_size: int = 512
    seqlen: int = 256
    batch_size: int = 16
    steps: int = 1500
    lr: float = 2e-3
    warmup_steps: int = 60
    weight_decay: float = 0.1
    corpus_docs: int = 200_000
    # Share of the corpus that is worked problems in prose (problem, equations, result; no instruction format).
    worked_fraction: float = 0.5
    seed: int = 0
    threads: int | None = None
    # LLaMA-like outlier input channels added after training without changing the function (models/tiny/outliers.py):
    # this share of every decoder linear's input channels gets ×outlier_factor (0 disables).
    outlier_fraction: float = 0.02
    outlier_factor: float = 8.0

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "vocab_size"):
            if getattr(self, name) % 64:
                raise ValueError(f"{name}={getattr(self, name)} must be divisible by 64 (quantization groups)")
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} must be divisible by heads {self.heads}")
        if not 0.0 <= self.outlier_fraction <= 1.0 or self.outlier_factor <= 0:
            raise ValueError(f"outlier_fraction must be in [0, 1] and outlier_factor > 0, got "
                             f"{self.outlier_fraction}, {self.outlier_factor}")
        if not 0.0 <= self.worked_fraction <= 1.0:
            raise ValueError(f"worked_fraction must be in [0, 1], got {self.worked_fraction}")
        if self.steps <= 0 or self.batch_size <= 0 or self.seqlen <= 1:
            raise ValueError("steps, batch_size must be > 0 and seqlen > 1")


def _blocks(tok, docs: list[str], seqlen: int) -> torch.Tensor:
    ids = concat_with_eos(tok, docs)
    n = len(ids) // seqlen
    return torch.tensor(ids[: n * seqlen]).view(n, seqlen)


def _recorded_config(out: Path) -> dict | None:
    """A tiny model's ``pretrain.json`` records the configuration that trained it."""
    f = out / "pretrain.json"
    info = read_json(f) if f.is_file() else None
    return {"settings": info.get("config") or {}, "complete": True} if isinstance(info, dict) else None


def pretrain_dir(path: str | Path) -> RunDir:
    """``lowbit pretrain-tiny --out``: written in one atomic step; ``pretrain.json`` is its record."""
    return RunDir(path, "pretrain-tiny", what="tiny model", stamp=None, recorded=_recorded_config,
                  record="pretrain.json")


def pretrain_tiny(out_dir: str | Path, cfg: PretrainConfig, progress: bool = True) -> dict:
    """Train the tiny base model and write it (fp16 safetensors, config, tokenizer, ``pretrain.json``)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    tok, data, held = _corpus(cfg)
    torch.manual_seed(cfg.seed)
    model = _new_model(cfg, tok)
    losses = _train(model, data, cfg, progress)
    heldout_ppl = _heldout_ppl(model, held)
    elapsed = time.perf_counter() - t_start
    info = {"config": asdict(cfg), "final_train_loss": sum(losses[-20:]) / 20, "heldout_ppl": heldout_ppl,
            "seconds": elapsed, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in model.parameters()),
            "command": f"lowbit pretrain-tiny --out {out_dir} --steps {cfg.steps} --seed {cfg.seed}",
            "loss_every_50": losses[::50]}
    model = model.half()
    if cfg.outlier_fraction > 0:
        from ..models.tiny.outliers import add_outlier_channels

        info["outliers"] = add_outlier_channels(model, cfg.outlier_fraction, cfg.outlier_factor, seed=cfg.seed)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / "pretrain.json", info)
    log.info("tiny model: held-out ppl %.3f, %.0fs -> %s", heldout_ppl, elapsed, out_dir)
    return info


def _corpus(cfg: PretrainConfig):
    """The tokenizer, the training blocks and the held-out blocks."""
    import random

    from ..data.synthetic import generate_split
    from ..models.tiny.corpus import pretrain_corpus, worked_corpus

    n_worked = int(cfg.corpus_docs * cfg.worked_fraction)
    docs = pretrain_corpus(cfg.corpus_docs - n_worked, seed=cfg.seed)
    if n_worked:
        docs += worked_corpus(n_worked, seed=cfg.seed)
        random.Random(cfg.seed).shuffle(docs)
    held_docs = pretrain_corpus(2000, seed=cfg.seed + 1000)
    # Prompt words must exist as tokens; the records themselves are not trained on.
    task_text = [r["instruction"] + "\n" + r["output"] for fam in ("gsm8k", "svamp", "mawps", "aqua")
                 for r in generate_split(fam, 500, seed=cfg.seed)]
    prompt = APIQ.replace("{instruction}\n", "")  # the ApiQ prompt without an instruction
    tok = build_tokenizer(docs[:20000] + task_text + [prompt] * 50, cfg.vocab_size)
    data = _blocks(tok, docs, cfg.seqlen)
    held = _blocks(tok, held_docs, cfg.seqlen)
    log.info("corpus: %d blocks of %d tokens (%.1fM tokens); tokenizer %d tokens", len(data), cfg.seqlen,
             data.numel() / 1e6, len(tok))
    return tok, data, held


def _new_model(cfg: PretrainConfig, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    mcfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                       max_position_embeddings=1024, tie_word_embeddings=False, rms_norm_eps=1e-5,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(mcfg)


def _lr_at(cfg: PretrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of ``cfg.lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _train(model, data: torch.Tensor, cfg: PretrainConfig, progress: bool) -> list[float]:
    """AdamW on random blocks (no weight decay on norms); -> the loss of every step."""
    from tqdm.auto import tqdm

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    losses = []
    bar = tqdm(range(cfg.steps), desc="pre-train tiny LLaMA", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        x = data[torch.randint(0, len(data), (cfg.batch_size,), generator=g)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    return losses


def _heldout_ppl(model, held: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        nll = [model(input_ids=held[i: i + 8], labels=held[i: i + 8]).loss.item() for i in range(0, len(held), 8)]
    return math.exp(sum(nll) / len(nll))
