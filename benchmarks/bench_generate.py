"""Batched vs one-at-a-time greedy generation on the embedded tiny model: wall time, examples/s, and a check that
both give the same continuations.

Prompts are the synthetic test problems of all four families in the Math10K prompt (~110–160 tokens). The ratio is
one-at-a-time time / batched time (> 1: batching is faster), each the median of ``--repeats`` runs after a warm-up.
Writes `benchmarks/results/generate.json` and prints a markdown table.
Usage: `python benchmarks/bench_generate.py [--prompts 32] [--max-new-tokens 32] [--batch-size 16] [--threads 1]`.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from lowbit._io import atomic_write_json
from lowbit.data.prompts import format_prompt
from lowbit.data.synthetic import FAMILIES, test_split
from lowbit.eval.generate import generate


def _time(fn, repeats: int) -> tuple[list[float], list[str]]:
    out = fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.models.tiny import tiny_model_dir

    tok = AutoTokenizer.from_pretrained(tiny_model_dir())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32).eval()
    per = -(-args.prompts // len(FAMILIES))
    prompts = [format_prompt(r["instruction"]) for f in FAMILIES for r in test_split(f, per)][: args.prompts]
    lens = [len(ids) for ids in tok(prompts)["input_ids"]]

    def single():
        return [generate(model, tok, [p], max_new_tokens=args.max_new_tokens, batch_size=1)[0] for p in prompts]

    def batched():
        return generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)

    t_single, out_single = _time(single, args.repeats)
    t_batched, out_batched = _time(batched, args.repeats)
    rows = []
    for name, ts, bs in (("one at a time", t_single, 1), (f"batched ({args.batch_size})", t_batched, args.batch_size)):
        med = statistics.median(ts)
        rows.append({"mode": name, "batch_size": bs, "median_s": med, "spread_s": max(ts) - min(ts),
                     "examples_per_s": len(prompts) / med})
    ratio = rows[0]["median_s"] / rows[1]["median_s"]
    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "model": "embedded tiny LLaMA (3.7M params, fp32)",
              "prompts": len(prompts), "prompt_tokens": [min(lens), max(lens)],
              "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "rows": rows,
              "speedup_batched_vs_single": ratio, "identical_outputs": out_single == out_batched}
    atomic_write_json(args.out, result)
    print(f"greedy generation, {len(prompts)} prompts of {min(lens)}-{max(lens)} tokens, {args.max_new_tokens} new "
          f"tokens, {torch.get_num_threads()} threads")
    print("| mode | median s | examples/s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['median_s']:.2f} | {r['examples_per_s']:.1f} |")
    print(f"batched is {ratio:.1f}x faster; identical outputs: {out_single == out_batched}")


if __name__ == "__main__":
    main()
