"""Batched vs one-at-a-time greedy generation on the embedded tiny model: wall time, examples/s, and a check that
both give the same continuations.

Prompts are the synthetic test problems of all four families in the Math10K prompt (~110–160 tokens). The ratio is
one-at-a-time time / batched time (> 1: batching is faster), each the median of ``--repeats`` runs after a warm-up,
the two modes alternating.
Writes `benchmarks/results/generate.json` and prints a markdown table.
Usage: `python benchmarks/bench_generate.py [--quick] [--prompts 32] [--max-new-tokens 32] [--batch-size 16]
[--threads 1]`.
"""

from __future__ import annotations

import statistics

import torch
from _common import base_parser, header_line, interleaved, machine_info, md_table, write_results

from lowbit.data.prompts import format_prompt
from lowbit.data.synthetic import FAMILIES, test_split
from lowbit.eval.generate import generate


def main() -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.max_new_tokens, args.batch_size = 4, 4, 4
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.tiny import tiny_model_dir

    tok = AutoTokenizer.from_pretrained(tiny_model_dir())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32).eval()
    per = -(-args.prompts // len(FAMILIES))
    prompts = [format_prompt(r["instruction"]) for f in FAMILIES for r in test_split(f, per)][: args.prompts]
    lens = [len(ids) for ids in tok(prompts)["input_ids"]]

    outs: dict[str, list[str]] = {}

    def single():
        outs["single"] = [generate(model, tok, [p], max_new_tokens=args.max_new_tokens, batch_size=1)[0]
                          for p in prompts]

    def batched():
        outs["batched"] = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens,
                                   batch_size=args.batch_size)

    ts = interleaved({"single": single, "batched": batched}, args.repeats)  # after one warm-up round
    t_single, t_batched = ts["single"], ts["batched"]
    out_single, out_batched = outs["single"], outs["batched"]
    rows = []
    for name, ts, bs in (("one at a time", t_single, 1), (f"batched ({args.batch_size})", t_batched, args.batch_size)):
        med = statistics.median(ts)
        rows.append({"mode": name, "batch_size": bs, "median_s": med, "spread_s": max(ts) - min(ts),
                     "examples_per_s": len(prompts) / med})
    ratio = rows[0]["median_s"] / rows[1]["median_s"]
    result = {"benchmark": "generate", "machine": info, "model": "embedded tiny LLaMA (3.7M params, fp32)",
              "prompts": len(prompts), "prompt_tokens": [min(lens), max(lens)],
              "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "rows": rows,
              "speedup_batched_vs_single": ratio, "identical_outputs": out_single == out_batched,
              "quick": args.quick}
    table = md_table(["mode", "median s", "spread s", "examples/s"],
                     [[r["mode"], r["median_s"], r["spread_s"], r["examples_per_s"]] for r in rows])
    md = (f"### Greedy generation on the tiny model: batched vs one at a time\n\n{header_line(info)}; "
          f"{len(prompts)} prompts of {min(lens)}-{max(lens)} tokens, {args.max_new_tokens} new tokens, median of "
          f"{args.repeats} runs.\n\n{table}\n\nBatched is {ratio:.1f}x faster; identical outputs: "
          f"{out_single == out_batched}.\n")
    write_results(args.out_dir, "generate", result, md)


if __name__ == "__main__":
    main()
