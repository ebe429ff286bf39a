"""Feasibility check for the embedded tiny model: full-parameter fine-tuning on the synthetic Math10K-style
training split, then greedy accuracy on the four synthetic test families.

    python scripts/tiny_full_finetune.py --model lowbit/models/tiny/tiny_arith --steps 400 --out ft_check.json

This is the "is >= 60% within reach" measurement of the tiny model (adapter fine-tuning comes with the recipes).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from lowbit.data.prompts import format_prompt
from lowbit.data.synthetic import FAMILIES, make_dataset
from lowbit.eval.accuracy import accuracy
from lowbit.io import atomic_write_json


def encode(tok, rec, max_len=256):
    p = tok(format_prompt(rec["instruction"], rec.get("input", "")), add_special_tokens=False)["input_ids"]
    r = tok(rec["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = (p + r)[:max_len]
    labels = ([-100] * len(p) + r)[:max_len]  # loss on the response only
    return ids, labels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="ft_check.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as d:
        paths = make_dataset(d, seed=args.seed, n_train=10000, n_test=args.n_test)
        train = json.loads(paths["train"].read_text())
        tests = {f: json.loads(paths[f].read_text()) for f in FAMILIES}
    enc = [encode(tok, r) for r in train]
    before = {f: accuracy(model, tok, tests[f][:50], f)[0] for f in FAMILIES}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / args.steps))
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    t0 = time.perf_counter()
    for step in (bar := tqdm(range(args.steps), desc="full fine-tune")):
        batch = [enc[i] for i in torch.randint(0, len(enc), (args.batch_size,), generator=g).tolist()]
        L = max(len(i) for i, _ in batch)
        ids = torch.tensor([i + [tok.pad_token_id] * (L - len(i)) for i, _ in batch])
        lab = torch.tensor([lb + [-100] * (L - len(lb)) for _, lb in batch])
        att = (torch.arange(L)[None] < torch.tensor([len(i) for i, _ in batch])[:, None]).long()
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    train_s = time.perf_counter() - t0
    after = {}
    for f in FAMILIES:
        acc, rows = accuracy(model, tok, tests[f], f)
        after[f] = acc
        print(f, f"{acc:.1f}%", "| e.g.", repr(rows[0]["generation"][:120]))
    avg = sum(after.values()) / len(after)
    res = {"model": args.model, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
           "train_seconds": train_s, "n_test": args.n_test, "accuracy_before": before, "accuracy_after": after,
           "average_after": avg}
    atomic_write_json(args.out, res)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
