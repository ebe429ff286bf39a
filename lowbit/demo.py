"""``lowbit demo``: quantize a small LLaMA with every method at 4 and 2 bits and print the error table.

Until the embedded pre-trained tiny model lands, the demo pre-trains a small LLaMA (hidden 128, 2 layers) for a
few hundred steps on a synthetic arithmetic corpus (cached under the output directory), so that perplexity and
output errors describe a model with real structure rather than random weights.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch

from ._io import atomic_dir, atomic_write_json
from .models.tiny import arithmetic_corpus, make_tokenizer, random_llama

log = logging.getLogger(__name__)

FULL_METHODS = [("rtn", {}), ("rtn", {"clip_search": True}), ("gptq", {}), ("magr-rtn", {}),
                ("magr-gptq", {}), ("nf", {})]
QUICK_METHODS = [("rtn", {}), ("gptq", {})]


def _pretrain(out: Path, steps: int, seqlen: int = 64, batch: int = 16, seed: int = 0) -> None:
    from tqdm.auto import tqdm

    tok = make_tokenizer()
    model = random_llama(hidden=128, layers=2, heads=4, intermediate=256, vocab_size=len(tok), seed=seed)
    ids = torch.tensor(tok("\n\n".join(arithmetic_corpus(20000, seed=seed)))["input_ids"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in (bar := tqdm(range(steps), desc="pre-train demo model")):
        starts = torch.randint(0, len(ids) - seqlen - 1, (batch,), generator=g)
        x = torch.stack([ids[s: s + seqlen] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def run_demo(out_dir: Path, quick: bool = False) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .eval.perplexity import perplexity
    from .quant.model import QuantConfig, quantize_model

    base_dir = out_dir / "base"
    if not (base_dir / "config.json").is_file():
        _pretrain(base_dir, steps=60 if quick else 400)
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    calib_ids = torch.tensor(tok("\n\n".join(arithmetic_corpus(2000, seed=1)))["input_ids"])
    held = torch.tensor(tok("\n\n".join(arithmetic_corpus(400, seed=2)))["input_ids"])
    seqlen = 128
    n = min(32, len(calib_ids) // seqlen)
    calib = calib_ids[: n * seqlen].view(n, seqlen)
    ppl_fp = perplexity(base, held, seqlen, max_windows=16)
    rows = [{"bits": 32, "method": "full precision", "ppl": ppl_fp, "rel_output_error": 0.0, "seconds": 0.0}]
    methods = QUICK_METHODS if quick else FULL_METHODS
    for bits in (4, 2):
        for method, extra in methods:
            model = copy.deepcopy(base)
            cfg = QuantConfig(method=method, bits=bits, group_size=64, **extra)
            t0 = time.perf_counter()
            report = quantize_model(model, cfg, calib, progress=False)
            dt = time.perf_counter() - t0
            errs = [r["rel_output_error"] for r in report if "rel_output_error" in r]
            name = method + (" +clip" if extra.get("clip_search") else "")
            rows.append({"bits": bits, "method": name, "ppl": perplexity(model, held, seqlen, max_windows=16),
                         "rel_output_error": sum(errs) / len(errs), "seconds": dt})
            log.info("%d-bit %-14s ppl %.3f", bits, name, rows[-1]["ppl"])
    atomic_write_json(out_dir / "results.json", rows)
    print(format_table(rows))
    print(f"\n(base: {base_dir}; results: {out_dir / 'results.json'})")
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| bits | method | held-out ppl | mean rel. output error | quantize time (s) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['bits']} | {r['method']} | {r['ppl']:.3f} | {r['rel_output_error']:.4f} | "
                     f"{r['seconds']:.2f} |")
    return "\n".join(lines)
